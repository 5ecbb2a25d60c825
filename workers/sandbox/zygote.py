"""The worker's side of the zygote (`child/zygote.py`): start it, prepare its slots,
send it runs, hear back when they end.

Bound to the event loop that started it. Every request carries the run's descriptors
(SCM_RIGHTS over a SOCK_SEQPACKET socket, so each message arrives whole); replies say a
slot is `prepared`, a run `started` (its pid) and `exited` (its return code, whether the
zygote saw its slot's cgroup empty, and which of its tmpfs filled up), or that a request
`failed` (why). If the zygote dies, every waiting run fails with `ZygoteLost` and this
zygote stays dead: the sandbox starts another.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


CHILD_DIR = Path(__file__).parent / "child"
ANSWER_SECONDS = 30.0  # for the zygote to prepare a slot (it builds a root: milliseconds)


class ZygoteLost(Exception):
    """The zygote died or stopped answering: the run's fate is unknown."""


class ZygoteRefused(Exception):
    """The zygote could not do what was asked (the message says why); it lives on."""


@dataclass(frozen=True)
class Exited:
    returncode: int
    clean: bool  # the zygote saw to it that no process of the slot is left
    full: tuple[str, ...] = ()  # the run's tmpfs mounts that were full at its end


class ZygoteRun:
    def __init__(self, zygote: ZygoteClient, run_id: int) -> None:
        self.zygote = zygote
        self.id = run_id
        loop = asyncio.get_running_loop()
        self.started: asyncio.Future[int] = loop.create_future()
        self.exited: asyncio.Future[Exited] = loop.create_future()

    async def wait(self) -> Exited:
        return await self.exited

    async def kill(self) -> None:
        await self.zygote.send({"op": "kill", "id": self.id}, ())


class ZygoteClient:
    """The worker's handle on one zygote process (`ZygoteServer` in `child/zygote.py`)."""

    def __init__(self, process: asyncio.subprocess.Process, control: socket.socket) -> None:
        self.process = process
        self.control = control
        self.alive = True
        self._ids = itertools.count(1)
        self._runs: dict[int, ZygoteRun] = {}
        self._prepared: dict[int, asyncio.Future[None]] = {}
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(control.fileno(), self._on_readable)

    @classmethod
    async def start(cls, python: str, env: Mapping[str, str]) -> ZygoteClient:
        """Start `child/zygote.py` on `python` (as root: it builds the slots' sandboxes)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            process = await asyncio.create_subprocess_exec(
                python,
                "-I",
                "-S",
                str(CHILD_DIR / "zygote.py"),
                "serve",
                str(theirs.fileno()),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                env=dict(env),
                cwd="/",
                start_new_session=True,  # the worker's terminal signals are not its
            )
        finally:
            theirs.close()
        ours.setblocking(False)
        return cls(process, ours)

    async def prepare(self, request: dict[str, object]) -> None:
        """Build slot `request["slot"]`'s sandbox; ZygoteRefused says why it could not."""
        slot = request["slot"]
        assert isinstance(slot, int)
        answer = self._loop.create_future()
        self._prepared[slot] = answer
        try:
            await self.send({**request, "op": "prepare"}, ())
            await asyncio.wait_for(asyncio.shield(answer), ANSWER_SECONDS)
        except TimeoutError:
            self.kill_now()
            raise ZygoteLost(
                f"no answer to preparing slot {slot} in {ANSWER_SECONDS:g} s"
            ) from None
        finally:
            self._prepared.pop(slot, None)

    async def run(self, request: dict[str, object], fds: Sequence[int]) -> ZygoteRun:
        """Ask for a run; returns once the zygote has forked it (the fds are then its)."""
        run = ZygoteRun(self, next(self._ids))
        self._runs[run.id] = run
        try:
            await self.send({**request, "op": "run", "id": run.id}, fds)
            await run.started
        except BaseException:
            self._runs.pop(run.id, None)
            raise
        return run

    async def send(self, message: dict[str, object], fds: Sequence[int]) -> None:
        if not self.alive:
            raise ZygoteLost("the zygote is not running")
        data = json.dumps(message).encode()
        while True:
            try:
                socket.send_fds(self.control, [data], list(fds))
                return
            except BlockingIOError:
                writable = self._loop.create_future()
                self._loop.add_writer(self.control.fileno(), writable.set_result, None)
                try:
                    await writable
                finally:
                    self._loop.remove_writer(self.control.fileno())
            except OSError as error:
                self._lost(f"cannot write to it: {error}")
                raise ZygoteLost(str(error)) from None

    def _on_readable(self) -> None:
        while True:
            try:
                data = self.control.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError as error:
                self._lost(str(error))
                return
            if not data:
                self._lost("it closed its socket")
                return
            self._answer(json.loads(data))

    def _answer(self, reply: dict[str, Any]) -> None:
        op = reply["op"]
        if op in ("prepared", "failed") and "id" not in reply:
            answer = self._prepared.get(reply["slot"])
            if answer is not None and not answer.done():
                if op == "prepared":
                    answer.set_result(None)
                else:
                    answer.set_exception(ZygoteRefused(str(reply["message"])))
            return
        run = self._runs.get(reply["id"])
        if run is None:
            return
        if op == "started" and not run.started.done():
            run.started.set_result(reply["pid"])
        elif op == "failed" and not run.started.done():
            self._runs.pop(run.id, None)
            run.started.set_exception(ZygoteRefused(str(reply["message"])))
            run.exited.cancel()
        elif op == "exited":
            self._runs.pop(run.id, None)
            if not run.exited.done():
                full = reply.get("full") or []
                assert isinstance(full, list)
                exited = Exited(
                    returncode=reply["returncode"],
                    clean=bool(reply["clean"]),
                    full=tuple(str(target) for target in full),
                )
                run.exited.set_result(exited)

    def _lost(self, why: str) -> None:
        if not self.alive:
            return
        self.alive = False
        self._loop.remove_reader(self.control.fileno())
        log.error(
            "sandbox: the zygote died (%s); a new one starts for the next run",
            why,
            extra={"zygote_pid": self.process.pid},
        )
        for run in self._runs.values():
            if not run.started.done():
                run.started.set_exception(ZygoteLost(why))
                run.exited.cancel()  # nobody waits for the end of a run that never began
            elif not run.exited.done():
                run.exited.set_exception(ZygoteLost(why))
        self._runs.clear()
        for answer in self._prepared.values():
            if not answer.done():
                answer.set_exception(ZygoteLost(why))

    async def close(self) -> None:
        """Stop the zygote: closing its socket makes it kill what it started and exit."""
        if self.alive:
            self.alive = False
            self._loop.remove_reader(self.control.fileno())
        self.control.close()
        try:
            await asyncio.wait_for(self.process.wait(), 5)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()

    def kill_now(self) -> None:
        """SIGKILL the zygote (it stopped answering; or a test of its loss): its runs
        fail with ZygoteLost once its socket closes."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, 9)
