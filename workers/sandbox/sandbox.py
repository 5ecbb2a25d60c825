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
import base64
import contextlib
import dataclasses
import logging
import os
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Literal

from workers.sandbox import layers, setup
from workers.sandbox.capture import OutputCapture
from workers.sandbox.cgroups import Counters, SlotCgroup
from workers.sandbox.errors import SandboxError, SandboxUnavailable
from workers.sandbox.layers import Layer
from workers.sandbox.limits import LimitKind, Limits
from workers.sandbox.processes import (
    Process,
    SpawnedProcess,
    ZygoteProcess,
    full_task_dir,
    limit_hit,
)
from workers.sandbox.spawn import BOOTSTRAP, Spawner
from workers.sandbox.users import (
    CLEAN_PATH,
    SlotUser,
    claim_users,
    uid_processes,
    wait_for_no_processes,
)
from workers.sandbox.zygote import ZygoteClient, ZygoteLost, ZygoteRefused

log = logging.getLogger(__name__)

TASK_DIR = setup.TASK_DIR


@dataclass(frozen=True)
class Capabilities:
    """What the sandbox found at `start`, and how it runs programs."""

    root: bool
    users: tuple[SlotUser, ...]  # one per slot when root, else empty
    layers: tuple[Layer, ...]
    python: str  # the interpreter Python programs run on
    isolated: bool  # runs are forked by the zygote into their namespaces (else spawned)
    refusal: str | None  # why programs are refused (a layer missing, no opt-in)

    @property
    def missing(self) -> list[Layer]:
        return layers.missing(self.layers)

    def active(self, name: str) -> bool:
        return any(layer.name == name and layer.active for layer in self.layers)


@dataclass(frozen=True)
class Argv:
    """Run an executable (found on the sandbox's clean PATH)."""

    argv: Sequence[str]


@dataclass(frozen=True)
class PythonSource:
    """Run Python source on the sandbox's interpreter through the bootstrap."""

    source: bytes


Program = Argv | PythonSource  # what a sandbox runs


@dataclass
class Ended:
    """How one sandboxed process ended. `returncode` is negative for a signal (as in
    subprocess) and None when it was killed for the deadline or a cancel. `limit` names
    the limit the run hit when it failed at one."""

    how: Literal["exited", "expired", "cancelled"]
    returncode: int | None
    stdout: bytes
    stderr: bytes
    truncated: bool
    report: bytes  # the Python bootstrap's report line(s), empty otherwise
    duration_ms: float
    limit: LimitKind | None = None


@dataclass
class Workspace:
    """A run's private directory (owned by the slot user, removed afterwards). `path` is
    where the worker finds it; the program sees it as `inside`."""

    slot: int
    path: Path
    inside: str
    env: dict[str, str] = field(default_factory=dict)
    clean: bool = True  # no process of the slot can be left (none ran, or it was killed)


def loop_deadline(deadline: datetime) -> float:
    """The event loop's clock reading at which `deadline` (aware UTC) passes."""
    remaining = (deadline - datetime.now(UTC)).total_seconds()
    return asyncio.get_running_loop().time() + remaining


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
        # One zygote per slot: it sits in its slot's cgroups, so that its runs are born in
        # them (moving a process into a cgroup costs an RCU grace period: ~13 ms here).
        self._zygotes: dict[int, ZygoteClient] = {}
        self._zygote_locks: dict[int, asyncio.Lock] = {}
        self._probing: dict[int, ZygoteClient] = {}  # new zygotes, running their first program
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

        Idempotent: the executors call it before each run, so a sandbox nobody started
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
        found: dict[str, Layer] = {}
        found[layers.SLOT_USERS] = Layer(
            layers.SLOT_USERS,
            root,
            f"{', '.join(u.name for u in users)}: one unprivileged user per slot"
            if root
            else f"not root (uid {os.geteuid()}): programs would run as this same user",
        )
        if root and self.isolate:
            found.update(await setup.probe_namespaces(self._spawner.tools["unshare"], self.limits))
            self._cgroups, cgroup_layers = setup.make_cgroups(users, self.limits)
            found.update(cgroup_layers)
            self._seccomp, found[layers.SECCOMP] = setup.build_seccomp()
        else:
            why = "needs the isolated sandbox (root)" if self.isolate else "isolation is off"
            for name in (*layers.NAMESPACES, *layers.CGROUP_LAYERS.values(), layers.SECCOMP):
                found[name] = Layer(name, False, why)
            found[layers.NETWORK_NS] = Layer(
                layers.NETWORK_NS,
                self._spawner.network,
                "a new one per run (spawned)" if self._spawner.network else network_problem,
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
                started = await asyncio.gather(
                    *(self._start_zygote(slot) for slot in range(len(users))),
                    return_exceptions=True,
                )
                zygotes = [z for z in started if isinstance(z, ZygoteClient)]
                if len(zygotes) < len(started):  # one slot without isolation: none runs
                    for zygote in zygotes:
                        await zygote.close()
                    raise next(z for z in started if isinstance(z, BaseException))
                self._zygotes = dict(enumerate(zygotes))
            except SandboxError as error:
                # Namespaces could be made, but not a root from them: run unisolated.
                self._capabilities = dataclasses.replace(
                    self._capabilities,
                    isolated=False,
                    layers=_with(self._capabilities.layers, layers.MOUNT_NS, False, str(error)),
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
        self._log_capabilities()

    async def _start_zygote(self, slot: int) -> ZygoteClient:
        """Start slot `slot`'s zygote, prepare the slot in it, run one program through it."""
        caps = self.capabilities
        zygote = await ZygoteClient.start(caps.python, {"PATH": CLEAN_PATH, "LANG": "C.UTF-8"})
        try:
            # A zygote replacing one that died keeps the run directories of runs that are
            # about to start.
            fresh = slot not in self._zygotes
            request = {**self._slot_request(slot, caps.users[slot]), "fresh": fresh}
            await zygote.prepare(request)
            self._probing[slot] = zygote
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
        except (ZygoteLost, ZygoteRefused, SandboxError) as error:
            await zygote.close()
            raise SandboxError(f"the zygote could not prepare the sandbox: {error}") from None
        finally:
            self._probing.pop(slot, None)
        return zygote

    def _slot_request(self, slot: int, user: SlotUser) -> dict[str, object]:
        limits = self.limits
        cgroup = self._cgroups.get(slot)
        return {
            "slot": slot,
            "uid": user.uid,
            "gid": user.gid,
            "runs_dir": str(self.work_dir / user.name),
            "stage_dir": str(self.work_dir / f".root-{user.name}"),
            "tmp_bytes": limits.tmp_bytes,
            "tmp_files": limits.tmp_files,
            "binds": self._binds,
            "etc": setup.etc_files(user),
            "cgroup_procs": cgroup.procs_files if cgroup else [],
            "seccomp": base64.b64encode(self._seccomp).decode() if self._seccomp else None,
        }

    async def _live_zygote(self, slot: int) -> ZygoteClient:
        """The slot's zygote; a new one if the last died (its runs failed with it)."""
        zygote = self._zygotes.get(slot)
        if zygote is not None and zygote.alive:
            return zygote
        lock = self._zygote_locks.setdefault(slot, asyncio.Lock())
        async with lock:
            zygote = self._zygotes.get(slot)
            if zygote is None or not zygote.alive:
                log.warning(
                    "sandbox: starting a new zygote for slot %d (the last one died)",
                    slot,
                    extra={"slot": slot},
                )
                replacement = await self._start_zygote(slot)
                if zygote is not None:
                    await zygote.close()
                self._zygotes[slot] = zygote = replacement
            return zygote

    async def close(self) -> None:
        """Kill whatever the slots still run and release the slot users and cgroups."""
        zygotes, self._zygotes = self._zygotes, {}
        for zygote in zygotes.values():
            await zygote.close()  # it kills what it started
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

    def _log_capabilities(self) -> None:
        caps = self.capabilities
        how = (
            "every run is forked by a warm zygote into its own namespaces"
            if caps.isolated
            else "programs are SPAWNED WITHOUT ISOLATION (util-linux wrappers)"
        )
        state = ", ".join(
            f"{layer.name}: {'on' if layer.active else 'OFF'}" for layer in caps.layers
        )
        extra = {
            "layers": {layer.name: layer.active for layer in caps.layers},
            "isolated": caps.isolated,
            "python": caps.python,
            "slot_users": [u.name for u in caps.users],
            "memory_bytes": self.limits.memory_bytes,
            "processes": self.limits.processes,
            "cpus": self.limits.cpus,
            "tmp_bytes": self.limits.tmp_bytes,
            "work_dir": str(self.work_dir),
        }
        if caps.refusal is not None:
            log.error(
                "sandbox: REFUSING python and csharp tasks: %s. Layers: %s",
                caps.refusal,
                state,
                extra=extra,
            )
        elif caps.missing:
            log.warning(
                "sandbox: RUNNING UNTRUSTED CODE WITHOUT %s (allowed by [sandbox] "
                "allow_unisolated): %s; python on %s",
                ", ".join(layer.name for layer in caps.missing),
                how,
                caps.python,
                extra=extra,
            )
        else:
            log.info(
                "sandbox ready: every layer is active (%s); %s; python on %s",
                state,
                how,
                caps.python,
                extra=extra,
            )

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
        child_fds = [_memfd("stdin", stdin), out_w, err_w]
        if isinstance(program, PythonSource):
            child_fds += [_memfd("code", program.source), report_w]
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
            zygote = self._probing.get(workspace.slot) or await self._live_zygote(workspace.slot)
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
            source = _memfd("bootstrap", BOOTSTRAP)
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
            zygote = self._zygotes.get(slot)
            spare = {zygote.process.pid} if zygote is not None and zygote.alive else set()
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


def _with(found: tuple[Layer, ...], name: str, active: bool, detail: str) -> tuple[Layer, ...]:
    return tuple(Layer(name, active, detail) if layer.name == name else layer for layer in found)


def _memfd(name: str, content: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    view = memoryview(content)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
