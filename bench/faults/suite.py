"""Fault injection: does every accepted task end exactly once, on time, through faults?

``python -m bench faults [--faults a,b] [--tasks N] [--quick] [--keep]``: each fault gets a
round of its own, with a fresh load, against the suite's own deployment
(bench/faults/deployment.py); docs/reliability.md says what a round does and what each
column means. Exit status 1 when any round lost a task, recorded two outcomes for an
attempt, ran a program twice in one attempt, left a run alive after its worker_lost, or
recorded a false worker_lost.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict
from typing import Any, NamedTuple, TypeVar

import psycopg

from bench.faults import servers
from bench.faults.deployment import CONCURRENCY, HEARTBEAT_SECONDS, LEASE_SECONDS, Deployment, Role
from bench.faults.load import Client, Submission, plan
from bench.faults.verify import RoundResult, Window, judge, read_round, replay
from bench.processes import signals_deferred
from bench.report import Run, eprint, markdown_table, parser

NAME = "faults"
GRACE = 30.0  # seconds past a task's deadline (or the fault's end) before it counts as lost
BEFORE_FAULT = 1.5  # seconds between the first part of the load and the fault
DOWN_SECONDS = 60.0  # PostgreSQL's outage
PARTITION_SECONDS = LEASE_SECONDS + 5  # the proxy paused
PROXY_DOWN_SECONDS = 5.0  # then killed, and started again after this
T = TypeVar("T")
# Blocks until the fault is over; says what it did. `worker` runs the round's longest
# program (the task past consumer_timeout), for faults of one worker.
Inject = Callable[[Deployment, Role, list[Window]], str]


class Fault(NamedTuple):
    description: str
    spread: float  # seconds over which the last third of the load is submitted
    inject: Inject


def _all(d: Deployment) -> frozenset[str]:
    return frozenset(w.label for w in d.workers)


def _kill_worker(d: Deployment, worker: Role, windows: list[Window]) -> str:
    at = time.time()
    assert worker.process is not None
    worker.process.kill()
    windows.append(Window("killed", frozenset({worker.label}), at, at))
    return f"SIGKILL {worker.label} (pid {worker.pid}), which ran the longest program"


def _kill_leader(d: Deployment, worker: Role, windows: list[Window]) -> str:
    leader, roles = d.leader()
    if leader is None or leader.process is None:
        raise RuntimeError("no api holds the reaper's lock")
    leader.process.kill()
    return f"SIGKILL {leader.label} (pid {leader.pid}), leader of {', '.join(roles)}"


def _restart_rabbitmq(d: Deployment, worker: Role, windows: list[Window]) -> str:
    started = time.monotonic()
    d.rabbitmq.stop()
    stopped = time.monotonic()
    time.sleep(5)
    d.rabbitmq.start()
    return (
        f"rabbitmqctl stop ({stopped - started:.1f} s), 5 s down, rabbitmq-server"
        f" ({time.monotonic() - stopped - 5:.1f} s to start)"
    )


def _restart_postgres(mode: str) -> Inject:
    def inject(d: Deployment, worker: Role, windows: list[Window]) -> str:
        began = time.time()
        d.postgres.restart(mode)
        windows.append(Window("cut off", _all(d), began, time.time()))
        return f"pg_ctl restart -m {mode} ({time.time() - began:.1f} s)"

    return inject


def _postgres_down(d: Deployment, worker: Role, windows: list[Window]) -> str:
    began = time.time()
    d.postgres.stop("fast")
    time.sleep(DOWN_SECONDS)
    d.postgres.start()
    windows.append(Window("cut off", _all(d), began, time.time()))
    return f"pg_ctl stop -m fast, {DOWN_SECONDS:g} s down, pg_ctl start"


def _partition(d: Deployment, worker: Role, windows: list[Window]) -> str:
    proxy = d.proxies[worker.label]
    began = time.time()
    proxy.pause()
    time.sleep(PARTITION_SECONDS)
    proxy.kill()
    time.sleep(PROXY_DOWN_SECONDS)
    proxy.start()
    windows.append(Window("cut off", frozenset({worker.label}), began, time.time()))
    return (
        f"the proxy between {worker.label} (which ran the longest program) and PostgreSQL"
        f" paused (SIGSTOP) {PARTITION_SECONDS:g} s, then killed, started again"
        f" {PROXY_DOWN_SECONDS:g} s later"
    )


FAULTS = {
    "worker-kill": Fault("a worker SIGKILLed", 2, _kill_worker),
    "leader-kill": Fault("the api leader SIGKILLed", 2, _kill_leader),
    "rabbitmq-restart": Fault("RabbitMQ stopped and started", 10, _restart_rabbitmq),
    "pg-restart-fast": Fault("PostgreSQL restarted (-m fast)", 2, _restart_postgres("fast")),
    "pg-restart-immediate": Fault(
        "PostgreSQL restarted (-m immediate)", 2, _restart_postgres("immediate")
    ),
    "pg-down-60s": Fault("PostgreSQL down 60 s", DOWN_SECONDS, _postgres_down),
    "worker-partition": Fault(
        "a worker partitioned from PostgreSQL", PARTITION_SECONDS, _partition
    ),
}


class Suite:
    """The rounds. The HTTP load runs on an asyncio loop on a thread of its own; the faults
    and every process start stay on the main thread (a process's death signal follows the
    thread that started it: bench/processes.py)."""

    def __init__(self, deployment: Deployment, tasks: int) -> None:
        self.d = deployment
        self.tasks = tasks
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="faults-http")
        self._thread.start()

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.submit(coroutine).result()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def live(self) -> list[tuple[str, str]]:
        return [(a.label, a.url) for a in self.d.live_apis()]

    def _runner_of(self, token: str, timeout: float = 30.0) -> Role:
        """The worker running the task of `token` (from its program's report); the first
        live worker if it has not started within `timeout`."""
        waited = time.monotonic()
        while time.monotonic() - waited < timeout:
            runs = [r for r in self.d.counter.runs() if r.token == token]
            if runs:
                label = max(runs, key=lambda r: r.at).worker
                return next(w for w in self.d.workers if w.label == label)
            time.sleep(0.1)
        return next(w for w in self.d.workers if w.alive())

    def round(self, fault: Fault, name: str) -> RoundResult:
        """One round, `name` (the fault's, with a suffix when it comes again)."""
        result = RoundResult(name, fault.description)
        restarted = self.d.ensure_running()
        if restarted:
            eprint(f"  restored before the round: {', '.join(restarted)}")
        submissions = plan(name, self.tasks)
        first = submissions[: len(submissions) * 2 // 3]
        client = Client(self.d.key)
        windows: list[Window] = []
        try:
            self.call(client.submit_all(first, self.live()))
            # The longest program (the plan's first task) runs when the fault strikes.
            worker = self._runner_of(submissions[0].token)
            time.sleep(BEFORE_FAULT)
            during = submissions[len(first) :]
            spread = self.submit(client.submit_spread(during, self.live, fault.spread))
            what = fault.inject(self.d, worker, windows)
            ended = time.time()
            eprint(f"  {name}: {what}")
            result.notes.append(what)
            alive = {w.label for w in self.d.workers if w.alive()}
            result.recovered = self.call(client.probe(self.live, ended, alive, self.d.worker_label))
            if alive <= set(result.recovered):
                result.recovery = max(result.recovered.values())
            else:
                missed = ", ".join(sorted(alive - set(result.recovered)))
                result.notes.append(f"no probe completed on {missed}")
            spread.result()
        finally:
            self.call(client.close())
        events = self._wait_ended(name, submissions, ended)
        runs = [r for r in self.d.counter.runs() if r.token.startswith(f"{name}/")]
        judge(result, submissions, events, runs, windows, self.d.worker_label, LEASE_SECONDS)
        refused = [s for s in submissions if not s.accepted]
        if refused:
            reasons = sorted({f"{s.status or 'no answer'}: {s.problem[:80]}" for s in refused})
            result.notes.append(f"refused: {'; '.join(reasons[:4])}")
            last = max(s.answered_at or 0.0 for s in refused) - ended
            if last > 0:
                result.notes.append(f"the last refusal was answered {last:.1f} s after the end")
        return result

    def _wait_ended(
        self, round_name: str, submissions: Sequence[Submission], fault_ended: float
    ) -> dict[Any, Any]:
        """The round's events once every task ended, or is `GRACE` s past its deadline and
        the fault's end; then a few seconds more for anything late to show."""
        accepted = {s.token for s in submissions if s.accepted}
        while True:
            try:
                events = read_round(self.d.database_url, round_name)
            except psycopg.Error:
                time.sleep(1)
                continue
            reports = [replay(t, e, self.d.worker_label) for t, e in events.items()]
            now = time.time()
            waiting = [
                r
                for r in reports
                if not r.terminal and now < max(r.deadline or fault_ended, fault_ended) + GRACE
            ]
            missing = accepted - {r.token for r in reports}
            if not waiting and (not missing or now > fault_ended + GRACE):
                break
            time.sleep(1)
        time.sleep(3)  # a late outcome or run after the last end shows up now
        return read_round(self.d.database_url, round_name)


def _seconds(value: float | None, digits: int = 1, missing: str = "never") -> str:
    return missing if value is None else f"{value:.{digits}f} s"


def render(header: str, results: Sequence[RoundResult]) -> str:
    headers = [
        "fault",
        "accepted",
        "refused: 5xx / no answer (stored anyway)",
        "ended exactly once",
        "lost",
        "duplicate outcomes",
        "programs run again after worker_lost / twice in one attempt",
        "runs alive after their worker_lost",
        "worker_lost (false)",
        "max lateness past deadline: recorded end / a run's last sign of life",
        "time to recover",
    ]
    rows = [
        [
            r.description,
            f"{r.accepted}/{r.submitted}",
            f"{r.refused_5xx} ({r.stored_though_5xx}) / {r.unanswered}"
            f" ({r.stored_though_unanswered})",
            f"{r.ended_once}/{r.accepted}",
            str(r.lost),
            str(r.duplicate_outcomes),
            f"{r.rerun_after_lost} / {r.duplicate_runs + r.unattributed_runs}",
            str(r.unfenced_runs),
            f"{r.worker_lost} ({r.false_worker_lost})",
            f"{_seconds(r.max_lateness, 2, '-')} / {_seconds(r.max_run_past_deadline, 2, '-')}",
            _seconds(r.recovery),
        ]
        for r in results
    ]
    lines = [header, "", markdown_table(headers, rows), ""]
    for r in results:
        ends = "; ".join(
            f"{kind}: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
            for kind, counts in r.ends.items()
        )
        recovered = ", ".join(f"{w} {t:.1f} s" for w, t in sorted(r.recovered.items()))
        lines.append(
            f"- {r.fault}: {' · '.join(r.notes)} · probes completed on: {recovered or 'none'}"
            f" · ends: {ends}."
        )
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    p = parser(NAME, __doc__, database=False, rounds=False)
    p.add_argument("--faults", default=",".join(FAULTS), help=f"in this order: {', '.join(FAULTS)}")
    p.add_argument("--tasks", type=int, default=60, help="tasks a round (default 60)")
    p.add_argument("--keep", action="store_true", help="keep the servers' and processes' files")
    args = p.parse_args(argv)
    if args.quick:  # one fault, a small round: a smoke run
        args.faults, args.tasks = "worker-kill", 10
    names = [n.strip() for n in args.faults.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAULTS]
    if unknown or args.tasks < 5:
        p.error(f"unknown fault {', '.join(unknown)}" if unknown else "--tasks must be >= 5")
    missing = servers.missing_tools() + ([] if os.geteuid() == 0 else ["root"])
    if missing:  # root: the sandbox's layers, and entering its network namespaces
        eprint(f"{NAME}: missing: {', '.join(missing)}")
        return 2
    servers.sweep(eprint)
    run = Run(NAME, argv)
    base = servers.workdir()
    deployment = Deployment(base, eprint)
    suite: Suite | None = None
    results: list[RoundResult] = []
    header, status = "", 0
    try:
        eprint(f"{NAME}: starting PostgreSQL, RabbitMQ and taskledger of its own in {base}")
        deployment.start()
        header = run.header(deployment.postgres.url)
        suite = Suite(deployment, args.tasks)
        for n, name in enumerate(names):
            repeat = names[:n].count(name)
            round_name = f"{name}-{repeat + 1}" if repeat else name
            eprint(f"{NAME}: round {round_name} ({args.tasks} tasks)")
            began = time.monotonic()
            try:
                result = suite.round(FAULTS[name], round_name)
            except Exception as error:  # noqa: BLE001 - the next round restores what it can
                eprint(f"  round {name} failed: {error!r}")
                result = RoundResult(round_name, FAULTS[name].description)
                result.notes.append(f"the round failed: {error!r}"[:300])
                status = 1
            results.append(result)
            eprint(
                f"  {result.accepted} accepted, {result.lost} lost,"
                f" {result.duplicate_outcomes} duplicate outcomes, recovered in"
                f" {_seconds(result.recovery)} ({time.monotonic() - began:.0f} s)"
            )
    except KeyboardInterrupt:
        eprint(f"{NAME}: interrupted")
        status = 130
    finally:
        with signals_deferred():
            if suite is not None:
                suite.close()
            deployment.close()
            if args.keep:
                eprint(f"{NAME}: kept {base}")
            else:
                shutil.rmtree(base, ignore_errors=True)
    if not results:
        return status or 1
    header += (
        f" · RabbitMQ {servers.PrivateRabbitMQ.version()} · {args.tasks} tasks a round · 2 api,"
        f" 2 workers of concurrency {CONCURRENCY} · lease {LEASE_SECONDS:g} s, heartbeat"
        f" {HEARTBEAT_SECONDS:g} s"
    )
    print(render(header, results) + "\n\n" + run.footer())
    run.keep({"header": header, "results": [asdict(r) for r in results]}, args.no_json)
    bad = any(
        r.lost
        or r.duplicate_outcomes
        or r.duplicate_runs
        or r.unattributed_runs
        or r.unfenced_runs
        or r.false_worker_lost
        for r in results
    )
    return status or (1 if bad else 0)
