"""The sandbox programs run in.

A worker creates one `Sandbox` with its concurrency as the number of slots, `await
sandbox.start()` once (it checks each layer, claims one unprivileged user per slot, makes
the slots' cgroups, starts one zygote per slot that builds the slot's namespaces, and logs
what is active), runs programs with `workspace()` + `run()`, and `await sandbox.close()` at
shutdown. One slot runs one program at a time; the caller (the worker) hands out slots.

Isolated (root, with mount, PID, IPC and network namespaces): every run is forked by its
slot's zygote (`child/zygote.py`) into its own world; see docs/sandbox.md. Where a layer is
missing the sandbox refuses to run programs (`SandboxUnavailable`) unless the operator
opted in (`allow_unisolated`); without namespaces it then spawns them through exec
wrappers (`spawn.py`), which isolate far less.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Literal

from workers.sandbox import layers, setup
from workers.sandbox.capabilities import Capabilities, log_capabilities, with_layer
from workers.sandbox.capture import OutputCapture
from workers.sandbox.cgroups import Counters, SlotCgroup
from workers.sandbox.errors import SandboxError, SandboxUnavailable
from workers.sandbox.limits import Limits
from workers.sandbox.processes import (
    Process,
    SpawnedProcess,
    ZygoteProcess,
    full_task_dir,
    limit_hit,
)
from workers.sandbox.programs import Argv, Ended, Program, PythonSource, Workspace, memfd
from workers.sandbox.spawn import BOOTSTRAP, Spawner
from workers.sandbox.users import (
    CLEAN_PATH,
    SlotUser,
    claim_users,
    uid_processes,
    wait_for_no_processes,
)
from workers.sandbox.zygote import ZygoteLost, ZygoteRefused
from workers.sandbox.zygotes import SlotZygotes

log = logging.getLogger(__name__)

TASK_DIR = setup.TASK_DIR


class Sandbox:
    def __init__(
        self,
        slots: int,
        limits: Limits | None = None,
        *,
        work_dir: Path | None = None,
        lock_dir: Path | None = None,
        isolate: bool = True,
        allow_unisolated: bool = False,
    ) -> None:
        """`isolate=False` asks for the unisolated (spawned) sandbox; `allow_unisolated`
        runs programs even when a layer is missing (the operator's explicit opt-in)."""
        if slots < 1:
            raise ValueError("a sandbox needs at least one slot")
        self.slots = slots
        self.limits = limits or Limits()
        base = Path(tempfile.gettempdir())
        self.work_dir = work_dir or base / "taskledger-sandbox"
        self.lock_dir = lock_dir or (
            Path("/run/lock/taskledger-sandbox")
            if Path("/run/lock").is_dir()
            else base / "taskledger-sandbox-locks"
        )
        self.isolate = isolate
        self.allow_unisolated = allow_unisolated or not isolate
        self._spawner = Spawner()
        self._zygotes = SlotZygotes(self._slot_request, self._probe)  # one per slot
        self._capabilities: Capabilities | None = None
        self._started = False
        self._starting: asyncio.Lock | None = None
        self._locks: list[IO[bytes]] = []
        self._cgroups: dict[int, SlotCgroup] = {}
        self._seccomp: bytes | None = None
        self._binds: list[str] = []
        self._orphaned: set[int] = set()  # slots whose killed processes may be zombies

    # -- start and stop -------------------------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        if self._capabilities is None:
            raise RuntimeError("Sandbox.start() has not run")
        return self._capabilities

    async def start(self) -> Capabilities:
        """Check each layer, claim one user per slot, prepare the slots, log it once.

        Idempotent, so that it may be called before each run: a sandbox nobody started
        starts on first use (in the event loop that uses it, as the zygote must)."""
        if self._started:
            return self.capabilities
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if not self._started:
                try:
                    await self._start()
                except BaseException:
                    await self.close()
                    raise
                self._started = True
        return self.capabilities

    async def _start(self) -> None:
        network_problem = await self._spawner.start()
        root = os.geteuid() == 0
        self.work_dir.mkdir(parents=True, exist_ok=True)
        # Root-owned and not listable: a slot user can enter only its own run directory.
        os.chmod(self.work_dir, 0o711)  # noqa: S103
        users: tuple[SlotUser, ...] = ()
        if root:
            claimed, self._locks = await claim_users(self.slots, self.lock_dir)
            users = tuple(claimed)
        found, self._cgroups, self._seccomp = await setup.find_layers(
            self._spawner, root, users, self.isolate, self.limits, network_problem
        )
        self._capabilities = Capabilities(
            root=root,
            users=users,
            layers=tuple(found[name] for name in layers.ORDER),
            python="",
            isolated=root and self.isolate and all(found[n].active for n in layers.NAMESPACES),
            refusal=None,
        )
        setup.sweep(self.work_dir, users)
        if self._capabilities.isolated:
            python, self._binds = await setup.choose_isolated_python()
            self._capabilities = dataclasses.replace(self._capabilities, python=python)
            try:
                await self._zygotes.start(python, len(users))
            except SandboxError as error:
                # Namespaces could be made, but not a root from them: run unisolated.
                self._capabilities = dataclasses.replace(
                    self._capabilities,
                    isolated=False,
                    layers=with_layer(
                        self._capabilities.layers, layers.MOUNT_NS, False, str(error)
                    ),
                )
        if not self._capabilities.isolated:
            for slot in range(len(users)):
                await self.kill_slot(slot)  # leftovers of a worker that died holding the user
            python = await setup.choose_spawned_python(self._spawner, self.limits, self._user(0))
            self._capabilities = dataclasses.replace(self._capabilities, python=python)
        missing = self._capabilities.missing
        if missing and not self.allow_unisolated:
            refusal = layers.refusal(missing)
            self._capabilities = dataclasses.replace(self._capabilities, refusal=refusal)
        log_capabilities(self.capabilities, self.limits, self.work_dir)

    async def _probe(self, slot: int) -> None:
        """Run one program in `slot` (its new zygote's first); SandboxError if it failed."""
        async with self.workspace(slot) as workspace:
            ended = await self.run(
                workspace,
                PythonSource(b"print(data)"),
                stdin=b"1",
                deadline=asyncio.get_running_loop().time() + 30,
                cancelled=asyncio.Event(),
            )
        if ended.returncode != 0 or ended.stdout != b"1\n":
            stderr = ended.stderr.decode(errors="replace").strip()
            raise SandboxError(f"a probe program {ended.how} {ended.returncode}: {stderr}")

    def _slot_request(self, slot: int) -> dict[str, object]:
        user, cgroup = self.capabilities.users[slot], self._cgroups.get(slot)
        return setup.slot_request(
            slot, user, self.work_dir, self.limits, cgroup, self._binds, self._seccomp
        )

    async def close(self) -> None:
        """Kill whatever the slots still run and release the slot users and cgroups."""
        await self._zygotes.close()  # each kills what it started
        if self._capabilities is not None:
            for slot in range(self.slots):
                await self.kill_slot(slot)
        for cgroup in self._cgroups.values():
            cgroup.remove()
        self._cgroups.clear()
        for lock in self._locks:
            lock.close()
        self._locks.clear()
        self._capabilities = None  # a later start() claims users again
        self._started = False

    # -- running ----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def workspace(self, slot: int) -> AsyncIterator[Workspace]:
        """A fresh directory for one run in `slot`; afterwards the slot is killed and the
        directory removed."""
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} is not in 0..{self.slots - 1}")
        user = self._user(slot)
        if slot in self._orphaned and user is not None:
            self._orphaned.discard(slot)
            await wait_for_no_processes(user, zombies=True)  # they count against NPROC
        runs = self._runs_dir(slot)
        path = runs / f"run-{secrets.token_hex(8)}"
        path.mkdir(mode=0o700)
        if user is not None:
            os.chown(path, user.uid, user.gid)
        isolated = self.capabilities.isolated
        inside = TASK_DIR if isolated else str(path)
        env = {
            "PATH": CLEAN_PATH,
            "HOME": inside,
            "TMPDIR": "/tmp" if isolated else inside,  # noqa: S108 - the run's own tmpfs
            "LANG": "C.UTF-8",
        }
        workspace = Workspace(slot=slot, path=path, inside=inside, env=env)
        try:
            yield workspace
        finally:
            if not workspace.clean:
                await self.kill_slot(slot)
            shutil.rmtree(path, ignore_errors=True)

    def _runs_dir(self, slot: int) -> Path:
        user = self._user(slot)
        if user is not None:
            runs = self.work_dir / user.name
        else:
            runs = self.work_dir / f"uid{os.getuid()}-pid{os.getpid()}"
        runs.mkdir(mode=0o711, exist_ok=True)
        return runs

    async def run(
        self,
        workspace: Workspace,
        program: Program,
        *,
        stdin: bytes,
        deadline: float,
        cancelled: asyncio.Event,
        limits: Limits | None = None,
    ) -> Ended:
        """Run one process in `workspace` until it ends, the loop clock passes `deadline`,
        or `cancelled` is set; then kill the slot. Output is captured up to the caps.

        Raises `SandboxUnavailable` when a layer is missing and not allowed, and
        `SandboxError` when the zygote died under the run (its slot is killed)."""
        refusal = self.capabilities.refusal
        if refusal is not None:
            raise SandboxUnavailable(refusal)
        limits = limits or self.limits
        loop = asyncio.get_running_loop()
        if cancelled.is_set():
            return Ended("cancelled", None, b"", b"", False, b"", 0.0)
        if loop.time() >= deadline:
            return Ended("expired", None, b"", b"", False, b"", 0.0)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        report_r, report_w = os.pipe()
        # The child's descriptors, in the order it gets them (0, 1, 2, then Python's).
        child_fds = [memfd("stdin", stdin), out_w, err_w]
        if isinstance(program, PythonSource):
            child_fds += [memfd("code", program.source), report_w]
        cgroup = self._cgroups.get(workspace.slot)
        before = cgroup.counters() if cgroup is not None else Counters()
        workspace.clean = False
        try:
            started = time.perf_counter()
            process = await self._launch(workspace, program, child_fds, limits)
        except BaseException:
            for fd in (out_r, err_r, report_r):
                os.close(fd)
            raise
        finally:
            for fd in {*child_fds, report_w}:
                os.close(fd)
        stdout = await OutputCapture.attach(out_r, limits.output_bytes)
        stderr = await OutputCapture.attach(err_r, limits.output_bytes)
        report = await OutputCapture.attach(report_r, 64 * 1024)
        how: Literal["exited", "expired", "cancelled"] = "exited"
        waiter = asyncio.ensure_future(process.wait())
        canceller = asyncio.ensure_future(cancelled.wait())
        try:
            done, _ = await asyncio.wait(
                {waiter, canceller},
                timeout=max(0.0, deadline - loop.time()),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if waiter not in done:
                how = "cancelled" if canceller in done else "expired"
                await process.kill()
        finally:
            canceller.cancel()
            try:
                # Whatever happens to this coroutine, nothing of the slot outlives it.
                if not waiter.done():
                    await process.kill()
                returncode = await waiter
                await process.clean()
                workspace.clean = True
            finally:
                duration_ms = (time.perf_counter() - started) * 1000
                await OutputCapture.drain(stdout, stderr, report)
        limit = None
        if how == "exited" and returncode != 0:
            after = cgroup.counters() if cgroup is not None else Counters()
            full = [*process.full, *full_task_dir(workspace.path, workspace.inside)]
            limit = limit_hit(before, after, full, returncode)
        return Ended(
            how=how,
            returncode=returncode if how == "exited" else None,
            stdout=stdout.data(),
            stderr=stderr.data(),
            truncated=stdout.truncated or stderr.truncated,
            report=report.data(),
            duration_ms=duration_ms,
            limit=limit,
        )

    async def _launch(
        self, workspace: Workspace, program: Program, child_fds: list[int], limits: Limits
    ) -> Process:
        user = self._user(workspace.slot)
        if self.capabilities.isolated:
            zygote = await self._zygotes.for_run(workspace.slot)
            request: dict[str, object] = {
                "slot": workspace.slot,
                "run_dir": workspace.path.name,
                "env": workspace.env,
                "limits": limits.rlimits(per_user=user is not None),
                "argv": list(program.argv) if isinstance(program, Argv) else None,
            }
            try:
                return ZygoteProcess(self, workspace.slot, await zygote.run(request, child_fds))
            except (ZygoteLost, ZygoteRefused) as error:
                raise SandboxError(f"the zygote could not start the run: {error}") from None
        source = None
        if isinstance(program, PythonSource):
            code_fd, report_fd = child_fds[3:]
            source = memfd("bootstrap", BOOTSTRAP)
            argv = Spawner.python_argv(self.capabilities.python, source, code_fd, report_fd)
            child_fds = [*child_fds, source]
        else:
            argv = list(program.argv)
        try:
            process = await self._spawner.spawn(
                argv, child_fds, env=workspace.env, cwd=workspace.path, limits=limits, user=user
            )
        finally:
            if source is not None:
                os.close(source)
        return SpawnedProcess(self, workspace.slot, process)

    # -- killing ----------------------------------------------------------------------

    async def kill_slot(self, slot: int, process_group: int | None = None) -> None:
        """SIGKILL every process of the slot: its process group, its cgroup, and (as root)
        every process of the slot's user, including any that left the group."""
        if process_group is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process_group, signal.SIGKILL)
        cgroup = self._cgroups.get(slot)
        if cgroup is not None:  # (its zygote lives there too)
            zygote = self._zygotes.pid(slot)
            spare = {zygote} if zygote is not None else set()
            await asyncio.to_thread(cgroup.kill, spare)
        user = self._user(slot)
        # No process of the user left means none can appear: only its own processes
        # (or we) could start one. That saves spawning the killer after most runs.
        if user is not None and uid_processes(user.uid):
            await self._spawner.kill_uid(user, self.capabilities.python)
            await wait_for_no_processes(user)
            self._orphaned.add(slot)  # their zombies may wait for pid 1 a while

    def _user(self, slot: int) -> SlotUser | None:
        users = self.capabilities.users
        return users[slot] if users else None

    def slot_uid(self, slot: int) -> int | None:
        user = self._user(slot)
        return None if user is None else user.uid
