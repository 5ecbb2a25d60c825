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
import errno
import fcntl
import logging
import os
import pwd
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Literal

log = logging.getLogger(__name__)

MiB = 1024 * 1024
USER_PREFIX = "tlsbx"
MAX_USERS = 256
CLEAN_PATH = "/usr/local/bin:/usr/bin:/bin"
# The bootstrap handed to the sandboxed interpreter with -c (stdlib only; read here, not
# imported, so that the slot user needs no access to the project's files).
CHILD_SOURCE = (Path(__file__).parent / "executors" / "child.py").read_text(encoding="utf-8")
# After the program's main process ends and its slot is killed, its pipes close at once;
# this only bounds the wait for a pipe held by something the sandbox could not kill.
PIPE_GRACE_SECONDS = 1.0


class SandboxError(Exception):
    """The sandbox cannot run programs on this machine (the message says why)."""


@dataclass(frozen=True)
class Limits:
    """Per-run limits. Memory is the address space of each process; processes count
    every process of the slot's user at once (root mode only)."""

    cpu_seconds: int = 10
    memory_bytes: int = 512 * MiB
    processes: int = 64
    file_size_bytes: int = 16 * MiB
    open_files: int = 64
    output_bytes: int = 1 * MiB  # each of stdout and stderr
    code_bytes: int = 64 * 1024


@dataclass(frozen=True)
class SlotUser:
    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class Capabilities:
    """What the sandbox could do on this machine, as detected by `Sandbox.start`."""

    root: bool
    users: tuple[SlotUser, ...]  # one per slot when root, else empty
    network_isolated: bool
    network_note: str  # why not, when not
    python: str  # the interpreter programs run on

    @property
    def separate_users(self) -> bool:
        return bool(self.users)


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
        self._capabilities: Capabilities | None = None
        self._locks: list[IO[bytes]] = []
        self._tools: dict[str, str] = {}

    # -- start and stop -------------------------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        if self._capabilities is None:
            raise RuntimeError("Sandbox.start() has not run")
        return self._capabilities

    async def start(self) -> Capabilities:
        """Detect what this machine allows, claim one user per slot, log it once."""
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
        users = tuple(await self._claim_users()) if root else ()
        isolated, note = await self._probe_network(root)
        self._capabilities = Capabilities(
            root=root, users=users, network_isolated=isolated, network_note=note, python=""
        )
        for user in users:
            await self._kill_uid(user)  # leftovers of a worker that died holding this user
        python = await self._choose_python()
        self._capabilities = replace(self._capabilities, python=python)
        self._log_capabilities()
        return self._capabilities

    async def close(self) -> None:
        """Kill whatever the slots still run and release the slot users."""
        if self._capabilities is not None:
            for slot in range(self.slots):
                await self.kill_slot(slot)
        for lock in self._locks:
            lock.close()
        self._locks.clear()

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
        log.info(
            "sandbox ready: %s; %s; python programs run on %s",
            who,
            network,
            caps.python,
            extra={
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

    async def _claim_users(self) -> list[SlotUser]:
        """One user per slot, each held by an flock so that two workers on one machine
        never share a user (killing by uid would kill the other's programs)."""
        self.lock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        users: list[SlotUser] = []
        for n in range(MAX_USERS):
            if len(users) == self.slots:
                return users
            name = f"{USER_PREFIX}{n}"
            lock = (self.lock_dir / f"{name}.lock").open("wb")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                continue
            self._locks.append(lock)
            users.append(await _ensure_user(name))
        raise SandboxError(f"no free sandbox user among {USER_PREFIX}0..{MAX_USERS - 1}")

    async def _probe_network(self, root: bool) -> tuple[bool, str]:
        argv = [self._tools["unshare"], "--net", "--", "true"]
        if not root:
            argv[1:1] = ["--user", "--map-current-user"]
        code, output = await _run_quietly(argv)
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
        path = Path(tempfile.mkdtemp(prefix=f"slot{slot}-", dir=self.work_dir))
        user = self._user(slot)
        if user is not None:
            os.chown(path, user.uid, user.gid)
        env = {"PATH": CLEAN_PATH, "HOME": str(path), "TMPDIR": str(path), "LANG": "C.UTF-8"}
        try:
            yield Workspace(slot=slot, path=path, env=env)
        finally:
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
        or `cancelled` is set; then kill the slot. Output is captured up to the caps."""
        limits = limits or self.limits
        loop = asyncio.get_running_loop()
        if cancelled.is_set():
            return Ended("cancelled", None, b"", b"", False, b"", 0.0)
        if loop.time() >= deadline:
            return Ended("expired", None, b"", b"", False, b"", 0.0)
        stdin_fd = _memfd("stdin", stdin)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        report_r, report_w = os.pipe()
        extra_fds: tuple[int, ...] = ()
        try:
            if isinstance(command, PythonSource):
                code_fd = _memfd("code", command.source)
                extra_fds = (code_fd, report_w)
                python = self.capabilities.python
                argv = [python, "-I", "-S", "-c", CHILD_SOURCE, "run", str(code_fd)]
                argv.append(str(report_w))
            else:
                argv = list(command.argv)
            started = time.perf_counter()
            process = await asyncio.create_subprocess_exec(
                *self._wrap(workspace, argv, limits),
                stdin=stdin_fd,
                stdout=out_w,
                stderr=err_w,
                pass_fds=extra_fds,
                env=workspace.env,
                cwd=workspace.path,
                start_new_session=True,
            )
        except BaseException:
            for fd in (out_r, err_r, report_r):
                os.close(fd)
            raise
        finally:
            for fd in (stdin_fd, out_w, err_w, report_w, *extra_fds):
                with contextlib.suppress(OSError):
                    os.close(fd)
        stdout = await _Capture.attach(out_r, limits.output_bytes)
        stderr = await _Capture.attach(err_r, limits.output_bytes)
        report = await _Capture.attach(report_r, 64 * 1024)
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
                _kill_group(process.pid)
        finally:
            canceller.cancel()
            # Whatever happens to this coroutine, nothing of the slot outlives it.
            if not waiter.done():
                _kill_group(process.pid)
            await self.kill_slot(workspace.slot, process.pid)
            returncode = await waiter
        duration_ms = (time.perf_counter() - started) * 1000
        await _Capture.drain(stdout, stderr, report)
        return Ended(
            how=how,
            returncode=returncode if how == "exited" else None,
            stdout=stdout.data(),
            stderr=stderr.data(),
            truncated=stdout.truncated or stderr.truncated,
            report=report.data(),
            duration_ms=duration_ms,
        )

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
        wrapped += [
            self._tools["prlimit"],
            # SIGXCPU at the soft limit says why; SIGKILL a second later if ignored.
            f"--cpu={limits.cpu_seconds}:{limits.cpu_seconds + 1}",
            f"--as={limits.memory_bytes}",
            f"--fsize={limits.file_size_bytes}",
            f"--nofile={limits.open_files}",
            "--core=0",
        ]
        if user is not None:  # RLIMIT_NPROC counts the real user's processes
            wrapped.append(f"--nproc={limits.processes}")
        return [*wrapped, "--", *argv]

    # -- killing ----------------------------------------------------------------------

    async def kill_slot(self, slot: int, process_group: int | None = None) -> None:
        """SIGKILL every process of the slot: its process group, and (as root) every
        process of the slot's user, including any that left the group with setsid()."""
        if process_group is not None:
            _kill_group(process_group)
        user = self._user(slot)
        if user is not None:
            await self._kill_uid(user)

    async def _kill_uid(self, user: SlotUser) -> None:
        # kill(-1) by a process running as the user reaches all its processes in one
        # step, under the kernel's task-list lock: a fork bomb cannot outrun it.
        if self._tools.get("kill"):
            argv = [self._tools["kill"], "-9", "-1"]
        else:
            argv = [sys.executable, "-I", "-S", "-c", "import os; os.kill(-1, 9)"]
        killer = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env={"PATH": CLEAN_PATH},
            cwd="/",
            user=user.uid,
            group=user.gid,
            extra_groups=[],
        )
        await killer.wait()  # exit 1 just means there was nothing to kill
        # Belt and braces: anything still there (a process that was between setuid and
        # exec, say) is found by its real uid in /proc.
        for _ in range(100):
            survivors = uid_processes(user.uid)
            if not survivors:
                return
            for pid in survivors:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            await asyncio.sleep(0.001)
        log.error(
            "sandbox: processes of %s survive SIGKILL",
            user.name,
            extra={"slot_user": user.name, "pids": uid_processes(user.uid)},
        )

    def _user(self, slot: int) -> SlotUser | None:
        users = self.capabilities.users
        return users[slot] if users else None

    def slot_uid(self, slot: int) -> int | None:
        user = self._user(slot)
        return None if user is None else user.uid


def uid_processes(uid: int) -> list[int]:
    """Live (not zombie) processes whose real uid is `uid`, read from /proc."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status", "rb") as status:
                text = status.read()
        except OSError:
            continue
        state = uid_field = None
        for line in text.splitlines():
            if line.startswith(b"State:"):
                state = line.split()[1]
            elif line.startswith(b"Uid:"):
                uid_field = int(line.split()[1])
                break
        if uid_field == uid and state not in (b"Z", b"X"):
            found.append(int(entry.name))
    return found


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


async def _ensure_user(name: str) -> SlotUser:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        code, output = await _run_quietly(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                "--comment",
                "taskledger sandbox slot",
                name,
            ]
        )
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise SandboxError(f"could not create the sandbox user {name}: {output}") from None
        if code == 0:
            log.info("sandbox: created the system user %s", name, extra={"slot_user": name})
    if entry.pw_uid == 0:
        raise SandboxError(f"sandbox user {name} has uid 0")
    return SlotUser(name=name, uid=entry.pw_uid, gid=entry.pw_gid)


async def _run_quietly(argv: list[str]) -> tuple[int, str]:
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={"PATH": CLEAN_PATH + ":/usr/sbin:/sbin", "LANG": "C.UTF-8"},
        )
    except OSError as error:
        return error.errno or errno.ENOENT, str(error)
    output, _ = await process.communicate()
    return process.returncode or 0, output.decode(errors="replace")


class _Capture(asyncio.Protocol):
    """Reads a pipe to its end, keeping the first `cap` bytes and dropping the rest."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.size = 0
        self.truncated = False
        self.chunks: list[bytes] = []
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.BaseTransport | None = None

    @classmethod
    async def attach(cls, fd: int, cap: int) -> _Capture:
        capture = cls(cap)
        pipe = os.fdopen(fd, "rb", buffering=0)
        transport, _ = await asyncio.get_running_loop().connect_read_pipe(lambda: capture, pipe)
        capture.transport = transport
        return capture

    @staticmethod
    async def drain(*captures: _Capture) -> None:
        """Wait for the pipes' ends; a pipe still open after the grace period (held by
        a process the sandbox could not kill) is closed with what it gave so far."""
        waits = [c.closed for c in captures]
        _, pending = await asyncio.wait(waits, timeout=PIPE_GRACE_SECONDS)
        for capture in captures:
            if capture.transport is not None and not capture.closed.done():
                capture.truncated = True
                capture.transport.close()
        if pending:
            await asyncio.wait(pending)

    def data_received(self, data: bytes) -> None:
        room = self.cap - self.size
        if room > 0:
            kept = data[:room]
            self.chunks.append(kept)
            self.size += len(kept)
        if len(data) > room:
            self.truncated = True

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def data(self) -> bytes:
        return b"".join(self.chunks)
