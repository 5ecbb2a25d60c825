"""taskledger against Celery, in the same run, on this machine.

``python -m bench [--quick] [--rounds N] [--scenarios a,b]``: both systems started as their
users run them (bench/systems/), each with fresh state of its own; in each round every
scenario runs for both in turn, the order alternating between rounds. The table
(bench/goals.py) gives per metric the median over the rounds, the ratio taskledger/Celery,
the goal and whether it is met; docs/performance.md says what each scenario measures.
Everything is stopped at the end, also on failure, Ctrl-C or SIGTERM; a scenario that
fails is reported under the table, what died is restarted and the run goes on (exit 1).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import secrets
import shutil
import statistics
import subprocess
import tempfile
import time
import timeit
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.cpu import measured
from bench.goals import CELERY, LAG, TASKLEDGER, Record, table
from bench.report import Run, eprint, parser
from bench.report import percentile as p
from bench.services import dbname, require_broker, temporary_database
from bench.systems import NOOP_CODE, Batch, Expiry, System
from workers.sandbox.users import CLEAN_PATH

NAME = "compare"
SCENARIOS = ("noop", "rtt", "python", "csharp", "ttl")
TTL_SECONDS = 1.0
HELLO_CS = 'class Hello { static void Main() { System.Console.WriteLine("hello"); } }\n'


@dataclass(frozen=True)
class Sizes:
    noop_tasks: int = 5_000
    round_trips: int = 200
    python_tasks: int = 1_000
    csharp_warm: int = 100
    csharp_cold: int = 10
    mono_runs: int = 20
    ttl_tasks: int = 200
    ttl_on_worker: int = 20
    python_spawns: int = 20


QUICK = Sizes(300, 30, 100, 10, 2, 10, 40, 4, 10)


@dataclass
class Context:
    sizes: Sizes
    record: Record
    systems: dict[str, System]
    hello_exe: Path | None = None
    own_python_ms: float = 0.0
    python3: str | None = None  # the machine's, for the bare spawn baseline

    def order(self, round_: int) -> list[System]:
        systems = list(self.systems.values())
        return systems if round_ % 2 == 1 else systems[::-1]

    def put(self, round_: int, system: str, **figures: float | None) -> None:
        """Record figures (`noop_rate=…` is metric `noop.rate`) and say them."""
        for name, value in figures.items():
            self.record.put(name.replace("_", ".", 1), system, round_, value)
        said = ", ".join(f"{k} {v:,.2f}" for k, v in figures.items() if v is not None)
        eprint(f"  round {round_} {system}: {said}")

    def fail(self, round_: int, scenario: str, system: str, problem: str) -> None:
        self.record.failures.append(f"round {round_}, {scenario}, {system}: {problem}")
        eprint(f"  FAILED round {round_} {scenario} {system}: {problem}")

    @contextlib.contextmanager
    def attempt(self, round_: int, scenario: str, system: str) -> Iterator[None]:
        """Record a failure of the block and go on; restart what died."""
        try:
            yield
        except Exception as error:  # noqa: BLE001 -- reported with the table, the run goes on
            self.fail(round_, scenario, system, f"{type(error).__name__}: {error}")
            eprint("".join(traceback.format_exception(error, limit=-3)).rstrip())
            if system in self.systems:
                with contextlib.suppress(Exception):
                    restarted = self.systems[system].ensure_running()
                    eprint(f"  restarted {system}: {', '.join(restarted) or 'nothing'}")

    def check(self, round_: int, scenario: str, system: str, batch: Batch) -> None:
        if batch.completed != batch.tasks:
            problem = f"only {batch.completed} of {batch.tasks} tasks completed ({batch.notes})"
            self.fail(round_, scenario, system, problem)


def scenario_noop(ctx: Context, round_: int) -> None:
    n = ctx.sizes.noop_tasks
    for system in ctx.order(round_):
        with ctx.attempt(round_, "noop", system.name):
            with measured(system.processes(), system.database_url) as cpu:
                batch = system.noop_batch(n)
            system.live_lag(n, batch)
            ctx.check(round_, "noop", system.name, batch)
            cpu.pop("other")
            for consumer, seconds in cpu.items():
                ctx.record.put(f"cpu.{consumer}", system.name, round_, 1000 * seconds / n)
            ctx.put(
                round_,
                system.name,
                noop_rate=batch.rate,
                noop_submit_rate=n / batch.submit_s,
                noop_cpu_ms=1000 * sum(cpu.values()) / n,
            )
            for name, values in batch.lag_ms.items():
                lag = {f"noop_lag_{name}_p{q}": p(values, q / 100) for q in (50, 99)}
                ctx.put(round_, system.name, **lag)
            if batch.lag_resolution_ms is not None:  # the lag monitor's median sample gap
                ctx.put(round_, system.name, noop_lag_resolution_ms=batch.lag_resolution_ms)


def scenario_rtt(ctx: Context, round_: int) -> None:
    for system in ctx.order(round_):
        with ctx.attempt(round_, "rtt", system.name):
            trips = system.round_trips(ctx.sizes.round_trips)
            rtts = [t.rtt_ms for t in trips]
            ctx.put(round_, system.name, **{f"rtt_p{q}": p(rtts, q / 100) for q in (50, 90, 99)})
            for leg in trips[0].legs_ms if trips else ():
                value = p([t.legs_ms[leg] for t in trips if leg in t.legs_ms], 0.5)
                ctx.record.put(f"leg.{leg}", system.name, round_, value)
            if not all(t.ok for t in trips):
                ctx.fail(round_, "rtt", system.name, "some round trips did not complete")


def scenario_python(ctx: Context, round_: int) -> None:
    n = ctx.sizes.python_tasks
    if ctx.python3 is None:
        ctx.fail(round_, "python", "bare python3", f"SKIPPED: no python3 on {CLEAN_PATH}")
    else:
        with ctx.attempt(round_, "python", "bare python3"):
            spawn = [ctx.python3, "-I", "-S", "-c", "pass"]
            bare = p(bare_runs(spawn, ctx.sizes.python_spawns), 0.5)
            for name in ctx.systems:
                ctx.put(round_, name, python_bare_p50=bare)
    for system in ctx.order(round_):
        with ctx.attempt(round_, "python", system.name):
            with measured(system.processes(), system.database_url) as cpu:
                batch = system.python_batch(n, NOOP_CODE)
            ctx.check(round_, "python", system.name, batch)
            cpu.pop("other")
            overhead = [v - ctx.own_python_ms for v in batch.run_ms]
            ctx.put(
                round_,
                system.name,
                python_rate=batch.rate,
                python_cpu_ms=1000 * sum(cpu.values()) / n,
                python_run_p50=p(batch.run_ms, 0.5),
                python_overhead_p50=p(overhead, 0.5),
                python_worker_p50=p(batch.worker_ms, 0.5),
            )


def bare_runs(command: Sequence[str], runs: int) -> list[float]:
    """Wall time of `command` started from this process, `runs` times (after 2 warm-ups):
    the baselines of the machine (`mono hello.exe`, `python3 -I -S -c pass`)."""
    times = []
    for _ in range(runs + 2):
        started = time.perf_counter()
        subprocess.run(command, capture_output=True, timeout=60, check=True)
        times.append((time.perf_counter() - started) * 1000)
    return times[2:]


def scenario_csharp(ctx: Context, round_: int) -> None:
    if ctx.hello_exe is None:
        ctx.fail(round_, "csharp", "both", "SKIPPED: Mono is not installed here (mono, mcs)")
        return
    with ctx.attempt(round_, "csharp", "bare mono"):
        bare = p(bare_runs(["mono", str(ctx.hello_exe)], ctx.sizes.mono_runs), 0.5)
        for name in ctx.systems:
            ctx.put(round_, name, csharp_bare_p50=bare)
    token = secrets.token_hex(4)
    for system in ctx.order(round_):
        with ctx.attempt(round_, "csharp", system.name):
            system.csharp_round_trips([HELLO_CS])  # the cache holds it from now on
            warm = system.csharp_round_trips([HELLO_CS] * ctx.sizes.csharp_warm)
            distinct = [f"hello {token}{system.name}{n}" for n in range(ctx.sizes.csharp_cold)]
            cold = system.csharp_round_trips([HELLO_CS.replace("hello", d) for d in distinct])
            if not all(t.ok for t in warm + cold):
                ctx.fail(round_, "csharp", system.name, "some runs did not complete")
            figures = {}
            for kind, trips in (("warm", warm), ("cold", cold)):
                figures[f"csharp_{kind}_rtt_p50"] = p([t.rtt_ms for t in trips], 0.5)
                worker = [t.worker_ms for t in trips if t.worker_ms is not None]
                figures[f"csharp_{kind}_worker_p50"] = p(worker, 0.5)
            figures["csharp_warm_run_p50"] = p(
                [t.run_ms for t in warm if t.run_ms is not None], 0.5
            )
            ctx.put(round_, system.name, **figures)


def _lateness(
    ctx: Context, round_: int, key: str, system: str, expiries: Sequence[Expiry], wanted: int
) -> None:
    late = [e.lateness_ms for e in expiries if e.lateness_ms is not None]
    if len(late) != wanted:
        statuses = sorted({e.status for e in expiries})
        ctx.fail(round_, "ttl", system, f"{key}: {len(late)} of {wanted} expired ({statuses})")
    figures = {f"ttl_{key}_p50": p(late, 0.5), f"ttl_{key}_p99": p(late, 0.99)}
    ctx.put(round_, system, **figures, **{f"ttl_{key}_max": max(late, default=None)})


def scenario_ttl(ctx: Context, round_: int) -> None:
    n = ctx.sizes.ttl_on_worker
    for system in ctx.order(round_):
        with ctx.attempt(round_, "ttl", system.name):
            _lateness(
                ctx, round_, "worker", system.name, system.expire_on_worker(n, TTL_SECONDS), n
            )
    from bench.systems.taskledger import Taskledger

    taskledger = ctx.systems[TASKLEDGER]
    assert isinstance(taskledger, Taskledger)
    with ctx.attempt(round_, "ttl reaper", TASKLEDGER):
        expiries = taskledger.expire_by_reaper(ctx.sizes.ttl_tasks, TTL_SECONDS)
        _lateness(ctx, round_, "reaper", TASKLEDGER, expiries, ctx.sizes.ttl_tasks)


RUNNERS: dict[str, Callable[[Context, int], None]] = {
    "noop": scenario_noop,
    "rtt": scenario_rtt,
    "python": scenario_python,
    "csharp": scenario_csharp,
    "ttl": scenario_ttl,
}


def machine_python3() -> str | None:
    """The machine's python3 as the sandbox finds it (on a clean PATH, links resolved):
    the interpreter of the python3 spawn baseline."""
    found = shutil.which("python3", path=CLEAN_PATH)
    return os.path.realpath(found) if found else None


def own_run_ms(code: str) -> float:
    """The program's own run time: its code exec'd in this interpreter (median of 200
    timings of 20 runs each, output discarded)."""
    compiled = compile(code, "<task>", "exec")

    def once() -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compiled, {"data": None})  # noqa: S102 -- the benchmark's own fixed program

    return statistics.median(timeit.repeat(once, number=20, repeat=200)) / 20 * 1000


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p_ = parser(NAME, __doc__, broker=True)
    p_.add_argument("--scenarios", default=",".join(SCENARIOS), help="a subset of the default")
    p_.add_argument("--concurrency", type=int, default=2, help="taskledger worker --concurrency")
    p_.add_argument("--celery-concurrency", type=int, default=2, help="celery worker --concurrency")
    p_.add_argument(
        "--connections", type=int, default=32, help="taskledger client's HTTP connections"
    )
    p_.add_argument(
        "--views-process",
        action="store_true",
        help="taskledger's projections in a process of their own (`taskledger api"
        " --no-projections` + `taskledger projections run`) instead of inside the api",
    )
    for f in fields(Sizes):
        default, quick = getattr(Sizes(), f.name), getattr(QUICK, f.name)
        p_.add_argument(
            "--" + f.name.replace("_", "-"), type=int, help=f"{default:,} ({quick:,} --quick)"
        )
    args = p_.parse_args(argv)
    args.rounds = 1 if args.quick else args.rounds
    args.scenarios = [s for s in SCENARIOS if s in args.scenarios.split(",")]
    sizes = QUICK if args.quick else Sizes()
    args.sizes = replace(
        sizes, **{f.name: getattr(args, f.name) for f in fields(Sizes) if getattr(args, f.name)}
    )
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    require_broker(NAME, args.broker_url)
    if importlib.util.find_spec("celery") is None:
        raise SystemExit(f"{NAME}: Celery is not installed: pip install -e '.[bench]'")
    from bench.systems.celery import CelerySystem
    from bench.systems.taskledger import Taskledger

    run = Run(NAME, argv)
    own = own_run_ms(NOOP_CODE)
    ctx = Context(args.sizes, Record(args.rounds), {}, own_python_ms=own, python3=machine_python3())
    try:
        with contextlib.ExitStack() as stack:
            tl_url, celery_url = (
                stack.enter_context(temporary_database(args.database_url, f"taskledger_bench_{s}_"))
                for s in ("tl", "celery")
            )
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tl-compare-")))
            header = run.header(tl_url)
            eprint(f"{NAME}: databases {dbname(tl_url)}, {dbname(celery_url)}; workdir {workdir}")
            if "csharp" in args.scenarios and shutil.which("mono") and shutil.which("mcs"):
                (workdir / "hello.cs").write_text(HELLO_CS)
                ctx.hello_exe = workdir / "hello.exe"
                command = ["mcs", f"-out:{ctx.hello_exe}", str(workdir / "hello.cs")]
                subprocess.run(command, capture_output=True, timeout=120, check=True)
            taskledger = Taskledger(
                tl_url,
                args.broker_url,
                args.concurrency,
                args.connections,
                workdir,
                eprint,
                views_process=args.views_process,
            )
            stack.callback(taskledger.close)
            # kombu names the root virtual host "//" where aio-pika takes "/"
            root = urlsplit(args.broker_url).path in ("", "/")
            celery_broker = args.broker_url.rstrip("/") + "//" if root else args.broker_url
            celery = CelerySystem(
                celery_url, celery_broker, args.celery_concurrency, workdir, eprint
            )
            stack.callback(celery.close)
            taskledger.start()
            celery.start()
            ctx.systems = {TASKLEDGER: taskledger, CELERY: celery}
            for round_ in range(1, args.rounds + 1):
                eprint(f"round {round_}/{args.rounds} ({ctx.order(round_)[0].name} first)")
                for scenario in args.scenarios:
                    RUNNERS[scenario](ctx, round_)
            systems = {name: system.facts() for name, system in ctx.systems.items()}
    except KeyboardInterrupt:
        eprint(f"{NAME}: interrupted; every process stopped, the databases dropped")
        return 130
    rendered, rows = table(ctx.record, args.scenarios)
    title = "## taskledger vs Celery" + " (QUICK: a smoke run, not a measurement)" * args.quick
    notes = "\n".join(_notes(ctx, rows, args.views_process))
    print("\n\n".join([title, header, _setup(args, systems), rendered, notes, run.footer()]))
    run.keep(
        {
            "settings": {k: v for k, v in vars(args).items() if k != "sizes"}
            | {"sizes": vars(args.sizes)},
            "systems": systems,
            "values": ctx.record.values,
            "failures": ctx.record.failures,
            "rows": rows,
        },
        args.no_json,
    )
    return 1 if ctx.record.failures else 0


def _setup(args: argparse.Namespace, systems: dict[str, dict[str, Any]]) -> str:
    celery = systems[CELERY]
    return (
        f"taskledger: {', '.join(systems[TASKLEDGER]['processes'].values())};"
        f" {args.connections} HTTP connections · Celery {celery['celery']} (kombu"
        f" {celery['kombu']}, SQLAlchemy {celery['sqlalchemy']}): 1 worker, prefork"
        f" --concurrency {args.celery_concurrency}, acks_late, PostgreSQL result backend,"
        f" .get() polling every {celery['get_interval_s']} s · {args.rounds} round(s), systems"
        " alternating; median [min–max] over rounds"  # noqa: RUF001
    )


def _notes(ctx: Context, rows: list[list[str]], views_process: bool) -> list[str]:
    record = ctx.record
    lines = [f"- FAILED: {failure}" for failure in record.failures]
    missed = [f"{r[0]} {r[1]} ({r[6]})" for r in rows if r[6].startswith("NO")]
    if missed:
        lines.append("- Goals not met (issue 18): " + "; ".join(missed))
    if views_process and any(r[1].startswith(LAG) for r in rows):
        lines.append(
            "- The live lag's goal is for the views inside the api; here they ran in a"
            " process of their own (--views-process)."
        )
    legs = record.medians("leg.", TASKLEDGER)
    if legs:
        said = ", ".join(f"{k} {v:.2f} ms" for k, v in legs.items())
        lines.append(
            f"- taskledger round trip by leg (event times; p50, median of the rounds): {said}."
        )
    cpu = {s: record.medians("cpu.", s) for s in ctx.systems}
    if any(cpu.values()):
        said = "; ".join(
            f"{s} " + ", ".join(f"{k} {v:.2f}" for k, v in c.items()) for s, c in cpu.items()
        )
        lines.append(
            "- CPU per no-op task (ms; median of the rounds): the system's processes with their"
            f" children, its PostgreSQL backends, RabbitMQ (all of it), the client: {said}."
        )
    lines.append(f"- Sizes: {', '.join(f'{k} {v:,}' for k, v in vars(ctx.sizes).items())}.")
    lines.append(
        f"- The program's own run time (its code exec'd in the benchmark's interpreter):"
        f" {ctx.own_python_ms * 1000:.1f} µs; overhead = run - that."
    )
    if record.get("python.bare_p50", TASKLEDGER):
        lines.append(
            f"- The bare spawn, the overhead's baseline: `{ctx.python3} -I -S -c pass`,"
            f" {ctx.sizes.python_spawns} times a round from this process (p50)."
        )
    return lines
