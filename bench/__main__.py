"""``python -m bench [NAME] [OPTIONS]``: one benchmark, with its own options
(``python -m bench NAME --help``). Without a NAME, ``compare`` (taskledger against Celery
in the same run): ``python -m bench --quick`` is ``python -m bench compare --quick``.
``python -m bench --list`` lists them."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from typing import cast

# name -> (module, what it measures against what); each module has main(argv) -> int.
BENCHMARKS = {
    "compare": ("bench.compare", "taskledger against Celery: throughput, latency, code, TTL"),
    "api_requests": ("bench.api_requests", "POST/GET /api/tasks req/s against GET /healthz"),
    "ledger_writes": ("bench.ledger_writes", "Ledger saves/s against eventsourcing's own"),
    "projections": ("bench.projections", "rebuild and live lag against eventsourcing's runner"),
    "faults": ("bench.faults.suite", "did every accepted task end exactly once, through faults?"),
    "bulk": ("bench.bulk", "POST /api/tasks/bulk against one cancel request per task"),
    "profile": ("bench.profile", "py-spy of the api and worker under the no-op load, by area"),
    "soak": ("bench.soak", "RSS, connections and p99 minute by minute at 70% load: growth?"),
}


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["--list"]:
        for name, (_, summary) in BENCHMARKS.items():
            print(f"{name}: {summary}")
        return 0
    name = arguments.pop(0) if arguments[:1] and arguments[0] in BENCHMARKS else "compare"
    module = importlib.import_module(BENCHMARKS[name][0])
    return cast(Callable[[list[str]], int], module.main)(arguments)


if __name__ == "__main__":
    sys.exit(main())
