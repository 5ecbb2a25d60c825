"""The sandbox programs run in: one unprivileged user per slot, resource limits, no
network, a fresh directory and a clean environment per run, and a way to kill everything
a slot started.

A worker creates one `Sandbox` with its concurrency as the number of slots, `await
sandbox.start()` once (it detects what this machine allows, creates the slot users and
logs what it found), runs programs with `workspace()` + `run()`, and `await
sandbox.close()` at shutdown. One slot runs one program at a time; the caller (the
worker) hands out slots.

Processes are started with subprocess's own thread-safe options and exec wrappers from
util-linux (`unshare`, `setpriv`, `prlimit`), never with `preexec_fn`: the worker's event
loop shares the process with threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Literal, Protocol

from workers.executors.capture import OutputCapture
from workers.executors.slot_users import (
    CLEAN_PATH,
    SandboxError,
    SlotUser,
    claim_users,
    run_quietly,
    uid_processes,
    wait_for_no_processes,
)
from workers.executors.zygote import Zygote, ZygoteLost, ZygoteRun

__all__ = [
    "CLEAN_PATH",
    "Argv",
    "Capabilities",
    "Command",
    "Ended",
    "Limits",
    "PythonSource",
    "Sandbox",
    "SandboxError",
    "SlotUser",
    "Workspace",
    "loop_deadline",
    "uid_processes",
]

log = logging.getLogger(__name__)

MiB = 1024 * 1024
ZYGOTE_ANSWER_SECONDS = 10.0  # for the zygote to report the end of a run it killed
# The code handed to the sandboxed interpreter with -c (stdlib only; read here, not
# imported, so that the slot user needs no access to the project's files): all of it for
# the zygote, the bootstrap part for a spawned program (compiling less is faster).
CHILD_SOURCE = (Path(__file__).parent / "executors" / "child.py").read_text(encoding="utf-8")
BOOTSTRAP_SOURCE = (
    CHILD_SOURCE[: CHILD_SOURCE.index("# -- the zygote")]
    + "raise SystemExit(run_python(int(sys.argv[1]), int(sys.argv[2])))\n"
)


@dataclass(frozen=True)
class Limits:
    """Per-run limits. Memory is the address space of each process; processes count
    every process of the slot's user at once (root mode only)."""

    # A backstop only: the deadline (at most the longest ttl) kills first. A lower cap would
    # kill legitimate long computations that still fit their ttl.
    cpu_seconds: int = 86_400
    memory_bytes: int = 512 * MiB
    # Threads count too (Mono starts a dozen), and so do zombies until pid 1 reaps them.
    processes: int = 256
    file_size_bytes: int = 16 * MiB
    open_files: int = 64
    output_bytes: int = 1 * MiB  # each of stdout and stderr
    code_bytes: int = 64 * 1024


@dataclass(frozen=True)
class Capabilities:
    """What the sandbox could do on this machine, as detected by `Sandbox.start`."""

    root: bool
    users: tuple[SlotUser, ...]  # one per slot when root, else empty
    network_isolated: bool
    network_note: str  # why not, when not
    python: str  # the interpreter programs run on
    zygote: bool = False  # programs are forked by a warm zygote (else spawned)


@dataclass(frozen=True)
class Argv:
    """Run an executable (found on the sandbox's clean PATH)."""

    argv: Sequence[str]


@dataclass(frozen=True)
class PythonSource:
    """Run Python source on the sandbox's interpreter through `child.run_python`."""

    source: bytes


Command = Argv | PythonSource


@dataclass
class Ended:
    """How one sandboxed process ended. `returncode` is negative for a signal (as in
    subprocess) and None when it was killed for the deadline or a cancel."""

    how: Literal["exited", "expired", "cancelled"]
    returncode: int | None
    stdout: bytes
    stderr: bytes
    truncated: bool
    report: bytes  # the Python bootstrap's report line(s), empty otherwise
    duration_ms: float


@dataclass
class Workspace:
    """A run's private directory (owned by the slot user, removed afterwards)."""

    slot: int
    path: Path
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
        zygote: bool = True,
    ) -> None:
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
        self.use_zygote = zygote
        self._zygote: Zygote | None = None
        self._capabilities: Capabilities | None = None
        self._started = False
        self._starting: asyncio.Lock | None = None
        self._locks: list[IO[bytes]] = []
        self._tools: dict[str, str] = {}
        self._orphaned: set[int] = set()  # slots whose killed processes may be zombies

    # -- start and stop -------------------------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        if self._capabilities is None:
            raise RuntimeError("Sandbox.start() has not run")
        return self._capabilities

    async def start(self) -> Capabilities:
        """Detect what this machine allows, claim one user per slot, log it once.

        Idempotent: the executors call it before each run, so a sandbox nobody started
        starts on first use (in the event loop that uses it, as the zygote must)."""
        if self._started:
            return self.capabilities
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if not self._started:
                await self._start()
                self._started = True
        return self.capabilities

    async def _start(self) -> None:
        for tool in ("unshare", "setpriv", "prlimit"):
            found = shutil.which(tool, path=CLEAN_PATH + ":/usr/sbin:/sbin")
            if found is None:
                raise SandboxError(f"`{tool}` is missing: install util-linux")
            self._tools[tool] = found
        self._tools["kill"] = shutil.which("kill", path=CLEAN_PATH) or ""
        root = os.geteuid() == 0
        self.work_dir.mkdir(parents=True, exist_ok=True)
        # Root-owned and not listable: a slot user can enter only its own run directory.
        os.chmod(self.work_dir, 0o711)  # noqa: S103
        users: tuple[SlotUser, ...] = ()
        if root:
            claimed, self._locks = await claim_users(self.slots, self.lock_dir)
            users = tuple(claimed)
        isolated, note = await self._probe_network(root)
        self._capabilities = Capabilities(
            root=root, users=users, network_isolated=isolated, network_note=note, python=""
        )
        for slot in range(len(users)):
            await self.kill_slot(slot)  # leftovers of a worker that died holding the user
        python = await self._choose_python()
        self._capabilities = replace(self._capabilities, python=python)
        if root and self.use_zygote:
            self._zygote = await self._start_zygote()
            self._capabilities = replace(self._capabilities, zygote=self._zygote is not None)
        self._log_capabilities()

    async def _start_zygote(self) -> Zygote | None:
        """Start the zygote and run one program through it; None (spawn) if that fails."""
        env = {"PATH": CLEAN_PATH, "LANG": "C.UTF-8"}
        zygote = await Zygote.start(self.capabilities.python, CHILD_SOURCE, env)
        self._zygote = zygote
        problem = ""
        try:
            async with self.workspace(0) as workspace:
                ended = await self.run(
                    workspace,
                    PythonSource(b"print(data)"),
                    stdin=b"1",
                    deadline=asyncio.get_running_loop().time() + 30,
                    cancelled=asyncio.Event(),
                )
            if not zygote.alive:  # (the probe was spawned instead)
                problem = "it died at start (its traceback is on the worker's stderr)"
            elif ended.returncode != 0 or ended.stdout != b"1\n":
                problem = f"{ended.how} {ended.returncode}: {ended.stderr.decode(errors='replace')}"
        except SandboxError as error:
            problem = str(error)
        if not problem:
            return zygote
        log.error("sandbox: the zygote does not work, spawning instead: %s", problem)
        self._zygote = None
        await zygote.close()
        return None

    async def close(self) -> None:
        """Kill whatever the slots still run and release the slot users."""
        if self._zygote is not None:
            await self._zygote.close()  # it kills what it started
            self._zygote = None
        if self._capabilities is not None:
            for slot in range(self.slots):
                await self.kill_slot(slot)
        for lock in self._locks:
            lock.close()
        self._locks.clear()
        self._capabilities = None  # a later start() claims users again
        self._started = False

    def _log_capabilities(self) -> None:
        caps = self.capabilities
        limits = self.limits
        if caps.root:
            who = (
                f"as root: each of the {self.slots} slots runs as its own unprivileged user "
                f"({', '.join(u.name for u in caps.users)}); at most {limits.processes} "
                "processes per slot; everything a slot started is killed by user id after "
                "each run"
            )
        else:
            who = (
                f"not root (uid {os.geteuid()}): programs run as this same user; no process "
                "limit per slot, and a program that leaves its process group can outlive "
                "its run"
            )
        network = (
            "no network (a new network namespace per run)"
            if caps.network_isolated
            else f"NETWORK IS NOT ISOLATED: {caps.network_note}"
        )
        start = (
            "programs are forked by a warm zygote process (spawned if it dies)"
            if caps.zygote
            else "every program is spawned through util-linux wrappers"
        )
        log.info(
            "sandbox ready: %s; %s; python programs run on %s; %s",
            who,
            network,
            caps.python,
            start,
            extra={
                "zygote": caps.zygote,
                "root": caps.root,
                "slot_users": [u.name for u in caps.users],
                "network_isolated": caps.network_isolated,
                "python": caps.python,
                "cpu_seconds": limits.cpu_seconds,
                "memory_bytes": limits.memory_bytes,
                "processes": limits.processes if caps.root else None,
                "file_size_bytes": limits.file_size_bytes,
                "open_files": limits.open_files,
                "output_bytes": limits.output_bytes,
                "work_dir": str(self.work_dir),
            },
        )

    async def _probe_network(self, root: bool) -> tuple[bool, str]:
        argv = [self._tools["unshare"], "--net", "--", "true"]
        if not root:
            argv[1:1] = ["--user", "--map-current-user"]
        code, output = await run_quietly(argv)
        if code == 0:
            return True, ""
        return False, f"`{' '.join(argv[:-2])}` failed here ({output.strip() or code})"

    async def _choose_python(self) -> str:
        """The interpreter for programs: ours, if the slot user can run it (it may live
        under a home directory it cannot enter), else the system's of the same version."""
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        candidates = [os.path.realpath(sys.executable)]
        for name in (version, "python3"):
            found = shutil.which(name, path=CLEAN_PATH)
            if found:
                candidates.append(os.path.realpath(found))
        problems = []
        for candidate in dict.fromkeys(candidates):
            problem = await self._probe_python(candidate)
            if problem is None:
                return candidate
            problems.append(f"{candidate}: {problem}")
        raise SandboxError("no Python interpreter runs in the sandbox: " + "; ".join(problems))

    async def _probe_python(self, python: str) -> str | None:
        async with self.workspace(0) as workspace:
            argv = self._wrap(workspace, [python, "-I", "-S", "-c", CHILD_SOURCE, "probe"])
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=workspace.env,
                cwd=workspace.path,
                start_new_session=True,
            )
            output, _ = await process.communicate()
        if process.returncode != 0:
            text = output.decode(errors="replace").strip().splitlines()
            return text[-1] if text else f"exit status {process.returncode}"
        return None

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
        path = Path(tempfile.mkdtemp(prefix=f"slot{slot}-", dir=self.work_dir))
        if user is not None:
            os.chown(path, user.uid, user.gid)
        env = {"PATH": CLEAN_PATH, "HOME": str(path), "TMPDIR": str(path), "LANG": "C.UTF-8"}
        workspace = Workspace(slot=slot, path=path, env=env)
        try:
            yield workspace
        finally:
            if not workspace.clean:
                await self.kill_slot(slot)
            shutil.rmtree(path, ignore_errors=True)

    async def run(
        self,
        workspace: Workspace,
        command: Command,
        *,
        stdin: bytes,
        deadline: float,
        cancelled: asyncio.Event,
        limits: Limits | None = None,
    ) -> Ended:
        """Run one process in `workspace` until it ends, the loop clock passes `deadline`,
        or `cancelled` is set; then kill the slot. Output is captured up to the caps.

        Raises `SandboxError` when the zygote died under the run (its slot is killed)."""
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
        if isinstance(command, PythonSource):
            child_fds += [_memfd("code", command.source), report_w]
        workspace.clean = False
        try:
            started = time.perf_counter()
            process = await self._launch(workspace, command, child_fds, limits)
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
        return Ended(
            how=how,
            returncode=returncode if how == "exited" else None,
            stdout=stdout.data(),
            stderr=stderr.data(),
            truncated=stdout.truncated or stderr.truncated,
            report=report.data(),
            duration_ms=duration_ms,
        )

    async def _launch(
        self, workspace: Workspace, command: Command, child_fds: list[int], limits: Limits
    ) -> _Process:
        zygote = self._zygote
        if zygote is not None and zygote.alive:
            user = self._user(workspace.slot)
            request: dict[str, object] = {
                "uid": user.uid if user else None,
                "gid": user.gid if user else None,
                "cwd": str(workspace.path),
                "env": workspace.env,
                "netns": self.capabilities.network_isolated,
                "limits": _rlimits(limits, per_user=user is not None),
                "argv": list(command.argv) if isinstance(command, Argv) else None,
            }
            try:
                return _ZygoteProcess(self, workspace.slot, await zygote.run(request, child_fds))
            except ZygoteLost:
                pass  # logged by the zygote client; spawn this one
        if isinstance(command, PythonSource):
            code_fd, report_fd = child_fds[3:]
            python = self.capabilities.python
            argv = [python, "-I", "-S", "-c", BOOTSTRAP_SOURCE, str(code_fd), str(report_fd)]
        else:
            argv = list(command.argv)
        process = await asyncio.create_subprocess_exec(
            *self._wrap(workspace, argv, limits),
            stdin=child_fds[0],
            stdout=child_fds[1],
            stderr=child_fds[2],
            pass_fds=child_fds[3:],
            env=workspace.env,
            cwd=workspace.path,
            start_new_session=True,
        )
        return _SpawnedProcess(self, workspace.slot, process)

    def _wrap(
        self, workspace: Workspace, argv: list[str], limits: Limits | None = None
    ) -> list[str]:
        """The exec wrappers that put `argv` in the sandbox: network namespace (as root,
        before dropping privileges), the slot user without new privileges, the limits."""
        limits = limits or self.limits
        caps = self.capabilities
        wrapped: list[str] = []
        if caps.network_isolated:
            wrapped += [self._tools["unshare"], "--net"]
            if not caps.root:
                wrapped += ["--user", "--map-current-user"]
            wrapped.append("--")
        user = self._user(workspace.slot)
        if user is not None:
            wrapped += [
                self._tools["setpriv"],
                f"--reuid={user.uid}",
                f"--regid={user.gid}",
                "--clear-groups",
                "--no-new-privs",
                "--",
            ]
        options = {
            "RLIMIT_CPU": "--cpu",
            "RLIMIT_AS": "--as",
            "RLIMIT_FSIZE": "--fsize",
            "RLIMIT_NOFILE": "--nofile",
            "RLIMIT_CORE": "--core",
            "RLIMIT_NPROC": "--nproc",
        }
        wrapped.append(self._tools["prlimit"])
        for name, (soft, hard) in _rlimits(limits, per_user=user is not None).items():
            wrapped.append(f"{options[name]}={soft}:{hard}")
        return [*wrapped, "--", *argv]

    # -- killing ----------------------------------------------------------------------

    async def kill_slot(self, slot: int, process_group: int | None = None) -> None:
        """SIGKILL every process of the slot: its process group, and (as root) every
        process of the slot's user, including any that left the group with setsid()."""
        if process_group is not None:
            _kill_group(process_group)
        user = self._user(slot)
        # No process of the user left means none can appear: only its own processes
        # (or we) could start one. That saves spawning the killer after most runs.
        if user is not None and uid_processes(user.uid):
            await self._kill_uid(user)
            await wait_for_no_processes(user)
            self._orphaned.add(slot)  # their zombies may wait for pid 1 a while

    async def _kill_uid(self, user: SlotUser) -> None:
        # kill(-1) by a process running as the user reaches all its processes in one
        # step, under the kernel's task-list lock: a fork bomb cannot outrun it. setpriv
        # rather than subprocess's user=, which cannot use vfork: ~1 ms less per run.
        # (Its exit status says nothing: kill(-1) succeeds if any process exists.)
        setuid = [
            self._tools["setpriv"],
            f"--reuid={user.uid}",
            f"--regid={user.gid}",
            "--clear-groups",
            "--",
        ]
        if self._tools.get("kill"):
            argv = [*setuid, self._tools["kill"], "-9", "-1"]
        else:
            python = self.capabilities.python or sys.executable
            argv = [*setuid, python, "-I", "-S", "-c", "import os; os.kill(-1, 9)"]
        killer = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env={"PATH": CLEAN_PATH},
            cwd="/",
        )
        await killer.wait()

    def _user(self, slot: int) -> SlotUser | None:
        users = self.capabilities.users
        return users[slot] if users else None

    def slot_uid(self, slot: int) -> int | None:
        user = self._user(slot)
        return None if user is None else user.uid


class _Process(Protocol):
    async def wait(self) -> int:
        """The return code (negative: killed by that signal)."""
        ...

    async def kill(self) -> None:
        """Kill the run now: its process, its group and its slot's user."""
        ...

    async def clean(self) -> None:
        """After the end: return once no process of the slot is left."""
        ...


class _SpawnedProcess:
    def __init__(self, sandbox: Sandbox, slot: int, process: asyncio.subprocess.Process) -> None:
        self.sandbox = sandbox
        self.slot = slot
        self.process = process

    async def wait(self) -> int:
        return await self.process.wait()

    async def kill(self) -> None:
        await self.sandbox.kill_slot(self.slot, self.process.pid)

    async def clean(self) -> None:
        await self.sandbox.kill_slot(self.slot, self.process.pid)


class _ZygoteProcess:
    def __init__(self, sandbox: Sandbox, slot: int, run: ZygoteRun) -> None:
        self.sandbox = sandbox
        self.slot = slot
        self.run = run
        self.clean_checked = False

    async def wait(self) -> int:
        try:
            exited = await self.run.wait()
        except ZygoteLost as error:
            await self.sandbox.kill_slot(self.slot)
            raise SandboxError(f"the zygote died during the run ({error})") from None
        self.clean_checked = exited.clean
        return exited.returncode

    async def kill(self) -> None:
        try:
            await self.run.kill()  # the zygote kills it and its slot's user, then reports
        except ZygoteLost:
            await self.sandbox.kill_slot(self.slot)
            return
        # The zygote reports the end of a killed run at once. If it does not, it is
        # broken: kill it, and the run fails with SandboxError after its slot is killed.
        loop = asyncio.get_running_loop()
        watchdog = loop.call_later(ZYGOTE_ANSWER_SECONDS, self.run.zygote.kill_now)
        self.run.exited.add_done_callback(lambda _: watchdog.cancel())

    async def clean(self) -> None:
        # The zygote cleans the slot before it reports the exit, unless it could not
        # tell what was left.
        if not self.clean_checked:
            await self.sandbox.kill_slot(self.slot)


def _rlimits(limits: Limits, *, per_user: bool) -> dict[str, tuple[int, int]]:
    """The limits as setrlimit pairs (soft, hard); what `_wrap` gives prlimit."""
    pairs = {
        # SIGXCPU at the soft limit says why; SIGKILL a second later if ignored.
        "RLIMIT_CPU": (limits.cpu_seconds, limits.cpu_seconds + 1),
        "RLIMIT_AS": (limits.memory_bytes, limits.memory_bytes),
        "RLIMIT_FSIZE": (limits.file_size_bytes, limits.file_size_bytes),
        "RLIMIT_NOFILE": (limits.open_files, limits.open_files),
        "RLIMIT_CORE": (0, 0),
    }
    if per_user:  # RLIMIT_NPROC counts the real user's processes
        pairs["RLIMIT_NPROC"] = (limits.processes, limits.processes)
    return pairs


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _memfd(name: str, content: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    view = memoryview(content)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
