"""The slots' zygotes, one per slot (`zygote.py` is the handle on one).

Each lives in its slot's cgroups, so that its runs are born in them (moving a process into
a cgroup costs an RCU grace period: ~13 ms here). A new zygote prepares its slot and runs
one program before it serves; one that died is replaced at its slot's next run.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from workers.sandbox.errors import SandboxError
from workers.sandbox.users import CLEAN_PATH
from workers.sandbox.zygote import ZygoteClient, ZygoteLost, ZygoteRefused

log = logging.getLogger(__name__)


class SlotZygotes:
    def __init__(
        self,
        request: Callable[[int], dict[str, object]],
        probe: Callable[[int], Awaitable[None]],
    ) -> None:
        """`request(slot)`: how the zygote is to prepare the slot; `probe(slot)`: run a
        program in the slot (through `for_run`), SandboxError if it did not work."""
        self._request = request
        self._probe = probe
        self.python = ""  # the interpreter they run on (set by `start`)
        self.serving: dict[int, ZygoteClient] = {}
        self._locks: dict[int, asyncio.Lock] = {}
        self._probing: dict[int, ZygoteClient] = {}  # new zygotes, running their first program

    async def start(self, python: str, slots: int) -> None:
        """One zygote per slot on `python`; SandboxError if one slot could not have its
        own (then none serves)."""
        self.python = python
        started = await asyncio.gather(
            *(self._start(slot) for slot in range(slots)), return_exceptions=True
        )
        zygotes = [z for z in started if isinstance(z, ZygoteClient)]
        if len(zygotes) < len(started):  # one slot without isolation: none runs
            for zygote in zygotes:
                await zygote.close()
            raise next(z for z in started if isinstance(z, BaseException))
        self.serving = dict(enumerate(zygotes))

    async def _start(self, slot: int) -> ZygoteClient:
        """Start slot `slot`'s zygote, prepare the slot in it, run one program through it."""
        zygote = await ZygoteClient.start(self.python, {"PATH": CLEAN_PATH, "LANG": "C.UTF-8"})
        try:
            # A zygote replacing one that died keeps the run directories of runs that are
            # about to start.
            fresh = slot not in self.serving
            await zygote.prepare({**self._request(slot), "fresh": fresh})
            self._probing[slot] = zygote
            await self._probe(slot)
        except (ZygoteLost, ZygoteRefused, SandboxError) as error:
            await zygote.close()
            raise SandboxError(f"the zygote could not prepare the sandbox: {error}") from None
        finally:
            self._probing.pop(slot, None)
        return zygote

    async def for_run(self, slot: int) -> ZygoteClient:
        """The zygote to run a program in `slot`: a new one running its first; else the
        slot's, or a new one if the last died (its runs failed with it)."""
        probing = self._probing.get(slot)
        if probing is not None:
            return probing
        zygote = self.serving.get(slot)
        if zygote is not None and zygote.alive:
            return zygote
        lock = self._locks.setdefault(slot, asyncio.Lock())
        async with lock:
            zygote = self.serving.get(slot)
            if zygote is None or not zygote.alive:
                log.warning(
                    "sandbox: starting a new zygote for slot %d (the last one died)",
                    slot,
                    extra={"slot": slot},
                )
                replacement = await self._start(slot)
                if zygote is not None:
                    await zygote.close()
                self.serving[slot] = zygote = replacement
            return zygote

    def pid(self, slot: int) -> int | None:
        """The process of the slot's zygote while it serves and lives."""
        zygote = self.serving.get(slot)
        return zygote.process.pid if zygote is not None and zygote.alive else None

    async def close(self) -> None:
        """Stop every zygote (each kills what it started)."""
        zygotes, self.serving = self.serving, {}
        for zygote in zygotes.values():
            await zygote.close()
