"""Run the benchmarks: ``python -m bench [--only NAME] [BENCHMARK OPTIONS...]``.

Options the dispatcher does not know are passed to every benchmark it runs, so
``python -m bench --only ledger_writes --seconds 2`` works like
``python -m bench.ledger_writes --seconds 2``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import cast

# name -> module; each module has main(argv: list[str] | None) -> int.
BENCHMARKS: dict[str, str] = {
    "ledger_writes": "bench.ledger_writes",
    "projections": "bench.projections",
    "api_requests": "bench.api_requests",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run taskledger benchmarks; unknown options go to each benchmark.",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(BENCHMARKS),
        metavar="NAME",
        help=f"run only this benchmark (repeatable); one of: {', '.join(sorted(BENCHMARKS))}",
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args, rest = parser.parse_known_args(argv)
    if args.list:
        for name in BENCHMARKS:
            print(name)
        return 0
    status = 0
    for name in args.only or list(BENCHMARKS):
        module = importlib.import_module(BENCHMARKS[name])
        run = cast(Callable[[list[str] | None], int], module.main)
        status = run(list(rest)) or status
    return status


if __name__ == "__main__":
    sys.exit(main())
