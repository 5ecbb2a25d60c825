"""A run in progress, as the sandbox sees it: forked by the zygote or spawned; and, at its
end, which limit it hit."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from workers.sandbox.cgroups import Counters
from workers.sandbox.errors import SandboxError
from workers.sandbox.limits import LimitKind, signal_limit
from workers.sandbox.setup import TASK_DIR
from workers.sandbox.zygote import ZygoteLost, ZygoteRun

ZYGOTE_ANSWER_SECONDS = 10.0  # for the zygote to report the end of a run it killed


class SlotKiller(Protocol):
    async def kill_slot(self, slot: int, process_group: int | None = None) -> None:
        """SIGKILL everything of the slot."""
        ...


class Process(Protocol):
    full: tuple[str, ...]  # the run's filesystems that were full at its end

    async def wait(self) -> int:
        """The return code (negative: killed by that signal)."""
        ...

    async def kill(self) -> None:
        """Kill the run now: everything it started."""
        ...

    async def clean(self) -> None:
        """After the end: return once no process of the slot is left."""
        ...


class SpawnedProcess:
    full: tuple[str, ...] = ()

    def __init__(self, sandbox: SlotKiller, slot: int, process: asyncio.subprocess.Process) -> None:
        self.sandbox = sandbox
        self.slot = slot
        self.process = process

    async def wait(self) -> int:
        return await self.process.wait()

    async def kill(self) -> None:
        await self.sandbox.kill_slot(self.slot, self.process.pid)

    async def clean(self) -> None:
        await self.sandbox.kill_slot(self.slot, self.process.pid)


class ZygoteProcess:
    def __init__(self, sandbox: SlotKiller, slot: int, run: ZygoteRun) -> None:
        self.sandbox = sandbox
        self.slot = slot
        self.run = run
        self.clean_checked = False
        self.full: tuple[str, ...] = ()

    async def wait(self) -> int:
        try:
            exited = await self.run.wait()
        except ZygoteLost as error:
            await self.sandbox.kill_slot(self.slot)
            raise SandboxError(f"the zygote died during the run ({error})") from None
        self.clean_checked = exited.clean
        self.full = exited.full
        return exited.returncode

    async def kill(self) -> None:
        try:
            await self.run.kill()  # pid 1 of the run's namespace: all of it dies
        except ZygoteLost:
            await self.sandbox.kill_slot(self.slot)
            return
        # The zygote reports the end of a killed run at once. If it does not, it is
        # broken: kill it, and the run fails with SandboxError after its slot is killed.
        loop = asyncio.get_running_loop()
        watchdog = loop.call_later(ZYGOTE_ANSWER_SECONDS, self.run.zygote.kill_now)
        self.run.exited.add_done_callback(lambda _: watchdog.cancel())

    async def clean(self) -> None:
        # The zygote saw the slot's cgroup empty before it reported the end, unless it
        # could not tell.
        if not self.clean_checked:
            await self.sandbox.kill_slot(self.slot)


def limit_hit(
    before: Counters, after: Counters, full: Sequence[str], returncode: int
) -> LimitKind | None:
    """Which limit a failed run hit, if any (the most telling first)."""
    if after.oom_kills > before.oom_kills:
        return "memory_limit"
    if after.pids_refused > before.pids_refused:
        return "pids"
    if full:
        return "disk_full"
    return signal_limit(returncode)


def full_task_dir(path: Path, inside: str) -> list[str]:
    """The run's directory (`path` on the host, `inside` in the run), if its filesystem
    (the slot's tmpfs) is full."""
    if inside != TASK_DIR:
        return []
    try:
        usage = os.statvfs(path.parent)
    except OSError:
        return []
    return [TASK_DIR] if usage.f_bavail == 0 or usage.f_favail == 0 else []
