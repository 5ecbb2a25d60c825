"""Run the benchmarks: ``python -m bench [--only NAME] [BENCHMARK OPTIONS...]``, or one
benchmark as a subcommand: ``python -m bench NAME [ITS OPTIONS...]`` (``python -m bench
faults --faults worker-kill``).

With no ``--only``, the default benchmark runs: ``compare`` (taskledger against Celery in
the same run). ``--only NAME`` (repeatable) runs others: ``ledger_writes``,
``projections``, ``api_requests`` measure one component each; ``--list`` lists them all.

Options the dispatcher does not know are passed to every benchmark it runs, so
``python -m bench --only ledger_writes --seconds 2`` works like
``python -m bench.ledger_writes --seconds 2``, and ``python -m bench --quick`` like
``python -m bench.compare --quick``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import cast

# name -> module; each module has NAME, SUMMARY and main(argv: list[str] | None) -> int.
BENCHMARKS: dict[str, str] = {
    "compare": "bench.compare",
    "ledger_writes": "bench.ledger_writes",
    "projections": "bench.projections",
    "api_requests": "bench.api_requests",
    "faults": "bench.faults.suite",
}
DEFAULT = ("compare",)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments and arguments[0] in BENCHMARKS:  # a subcommand: its options are its own
        module = importlib.import_module(BENCHMARKS[arguments[0]])
        return cast(Callable[[list[str] | None], int], module.main)(arguments[1:])
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run taskledger benchmarks (default: compare, taskledger against Celery);"
        " unknown options go to each benchmark.",
        epilog="Each benchmark's own options: python -m bench.NAME --help"
        " (e.g. python -m bench.compare --help).",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(BENCHMARKS),
        metavar="NAME",
        help=f"run this benchmark instead of the default (repeatable); one of:"
        f" {', '.join(BENCHMARKS)}",
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args, rest = parser.parse_known_args(arguments)
    if args.list:
        for name, module_name in BENCHMARKS.items():
            summary = str(getattr(importlib.import_module(module_name), "SUMMARY", ""))
            default = " (default)" if name in DEFAULT else ""
            print(f"{name}{default}: {summary}")
        return 0
    status = 0
    for name in args.only or list(DEFAULT):
        module = importlib.import_module(BENCHMARKS[name])
        run = cast(Callable[[list[str] | None], int], module.main)
        status = run(list(rest)) or status
    return status


if __name__ == "__main__":
    sys.exit(main())
