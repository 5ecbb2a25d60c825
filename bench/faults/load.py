"""The load of one round: mixed tasks, each program reporting its run (bench/faults/runs.py),
submitted over HTTP to the live api processes; and the probe that measures recovery."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from bench.faults.runs import PRELUDE

SUBMIT_TIMEOUT = 10.0  # seconds a submission may take before the client gives up


@dataclass(frozen=True)
class Kind:
    name: str
    code: str  # after PRELUDE
    ttl_seconds: float
    max_attempts: int
    expected: str  # the status it ends with when nothing goes wrong


QUICK = Kind("quick", "print(data['n'] * 2)", 60, 3, "Completed")
LONG = Kind("long (5 s)", "import time\ntime.sleep(5)\nprint('done')", 60, 3, "Completed")
FAILING = Kind("failing", "raise SystemExit('fails on purpose')", 60, 2, "Failed")
EXPIRING = Kind("expiring (ttl 4 s, runs 30 s)", "import time\ntime.sleep(30)", 4, 2, "Expired")
# Longer than the private RabbitMQ's consumer_timeout (bench/faults/servers.py), and than
# a lease: each fault strikes while it runs (on the worker a worker fault picks).
SLEEP_25 = "import time\ntime.sleep(25)\nprint('done')"
PAST_CONSUMER_TIMEOUT = Kind("past consumer_timeout (25 s)", SLEEP_25, 120, 3, "Completed")
# Per 20 tasks: 10 quick, 4 long, 3 failing, 3 expiring; and one past consumer_timeout.
PATTERN = [QUICK, LONG, QUICK, FAILING, QUICK, EXPIRING, QUICK, LONG] * 2
PATTERN += [QUICK, FAILING, EXPIRING, QUICK]
PROBE = {"description": "faults probe", "language": "echo", "data": "probe", "ttl_seconds": 120}
PROBE_EVERY = 0.5  # seconds between probes while recovering


@dataclass
class Submission:
    token: str
    kind: Kind
    body: dict[str, Any]
    answered_at: float | None = None  # time.time()
    status: int | None = None  # HTTP status; None: no answer
    problem: str = ""  # the error or the problem's title when not 201

    @property
    def accepted(self) -> bool:
        return self.status == 201


def plan(round_name: str, tasks: int) -> list[Submission]:
    """`tasks` submissions of the mix: one past consumer_timeout, the rest in PATTERN."""
    kinds = [PAST_CONSUMER_TIMEOUT, *itertools.islice(itertools.cycle(PATTERN), tasks - 1)]
    submissions = []
    for n, kind in enumerate(kinds[:tasks]):
        token = f"{round_name}/{n}/{secrets.token_hex(4)}"
        body = {
            "description": f"faults {round_name} {kind.name} {token}",
            "language": "python",
            "code": PRELUDE + kind.code,
            "data": {"token": token, "n": n},
            "ttl_seconds": kind.ttl_seconds,
            "max_attempts": kind.max_attempts,
        }
        submissions.append(Submission(token, kind, body))
    return submissions


class Client:
    """HTTP to the deployment's apis; each call goes to the next live api."""

    def __init__(self, key: str) -> None:
        self._http = httpx.AsyncClient(
            headers={"Authorization": f"ApiKey {key}"}, timeout=SUBMIT_TIMEOUT
        )
        self._turn = itertools.count()  # submissions alternate over the apis
        self._probe_turn = itertools.count()  # and so do the probes

    async def close(self) -> None:
        await self._http.aclose()

    async def submit(self, submission: Submission, apis: Sequence[tuple[str, str]]) -> None:
        """POST it once (no retry: a refusal is counted, not hidden) to the next api of
        `apis` (label, base url)."""
        if not apis:
            submission.problem = "no api process running"
        else:
            try:
                url = apis[next(self._turn) % len(apis)][1]
                response = await self._http.post(f"{url}/api/tasks", json=submission.body)
            except httpx.HTTPError as error:
                submission.problem = f"{type(error).__name__}: {error}"[:200]
            else:
                submission.status = response.status_code
                if response.status_code != 201:
                    submission.problem = response.text[:200]
                    with contextlib.suppress(ValueError, LookupError, TypeError):
                        submission.problem = str(response.json()["title"])
        submission.answered_at = time.time()

    async def submit_all(
        self, submissions: Sequence[Submission], apis: Sequence[tuple[str, str]], lanes: int = 8
    ) -> None:
        order = iter(submissions)

        async def lane() -> None:
            for submission in order:
                await self.submit(submission, apis)

        await asyncio.gather(*(lane() for _ in range(lanes)))

    async def submit_spread(
        self,
        submissions: Sequence[Submission],
        apis: Callable[[], Sequence[tuple[str, str]]],
        seconds: float,
    ) -> None:
        """One submission every `seconds / len` seconds, each to a then-live api."""
        gap = seconds / max(1, len(submissions))
        pending = []
        for submission in submissions:
            pending.append(asyncio.create_task(self.submit(submission, apis())))
            await asyncio.sleep(gap)
        await asyncio.gather(*pending)

    async def probe(
        self,
        apis: Callable[[], Sequence[tuple[str, str]]],
        since: float,
        workers: set[str],
        label_of: Callable[[str], str],
        limit: float = 240.0,
    ) -> dict[str, float]:
        """Seconds from `since` until each of `workers` has completed a fresh task: an echo
        probe goes to a live api at once and then every PROBE_EVERY seconds, until each
        of `workers` (labels) has completed one of them, or `limit` passed. An echo task
        needs no sandbox slot, so the probe measures the pipeline (api, store, dispatcher,
        broker, worker, store), not the backlog of the load's programs."""
        recovered: dict[str, float] = {}
        done = asyncio.Event()

        async def one() -> None:
            live = apis()
            if not live:
                return
            _, url = live[next(self._probe_turn) % len(live)]
            try:
                response = await self._http.post(f"{url}/api/tasks", json=PROBE)
                if response.status_code != 201:
                    return
                task_id = response.json()["id"]
                while not done.is_set():
                    response = await self._http.get(
                        f"{url}/api/tasks/{task_id}", params={"wait": 2}, timeout=10
                    )
                    if response.status_code != 200:
                        await asyncio.sleep(0.5)
                        continue
                    task = response.json()
                    if task["status"] in ("Pending", "InProgress"):
                        continue
                    if task["status"] == "Completed" and task.get("worker_id"):
                        label = label_of(str(task["worker_id"]))
                        recovered.setdefault(label, time.time() - since)
                        if workers <= set(recovered):
                            done.set()
                    return
            except httpx.HTTPError:
                return

        probes: list[asyncio.Task[None]] = []
        try:
            while not done.is_set() and time.time() - since < limit:
                probes.append(asyncio.create_task(one()))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), PROBE_EVERY)
        finally:
            for probe in probes:
                probe.cancel()
            await asyncio.gather(*probes, return_exceptions=True)
        return recovered
