"""The zygote: a warm, single-threaded root interpreter that builds each slot's sandbox
once and forks one child per run into it.

Standard library only. The worker starts it as

    python -I -S .../workers/sandbox/child/zygote.py serve CONTROL_FD

(`-I -S`: neither the project nor a virtualenv is on its path; it loads `bootstrap.py`
from beside itself) and talks to it over CONTROL_FD, a SOCK_SEQPACKET socket: JSON
requests, the run's descriptors attached (SCM_RIGHTS), JSON replies. Its process name is
`tl-zygote` (`pgrep tl-zygote`).

Once per slot (`prepare`):
- the slot's run directories get a size-limited tmpfs on the host, `<work dir>/<slot
  user>`; one left by a worker that was killed is unmounted first (that sweeps its runs);
- the slot's root: a read-only tmpfs holding read-only bind mounts of what the languages
  need (`/usr`, the interpreter's prefix, `/etc/mono`, …), a small `/etc` written here
  (passwd, group, hosts), and `/dev/null`, `zero`, `full`, `random`, `urandom`. It is kept
  as a mount namespace (an open descriptor) that each run enters;
- its empty network namespace, kept the same way;
- its cgroups' `cgroup.procs`, opened for writing.

Per run (`run`): the zygote unshares a PID namespace for its next child and forks. The
child is pid 1 there: when it ends, the kernel kills everything else in the namespace, so
nothing a run started outlives it. The child joins the slot's cgroups, enters the slot's
network and mount namespaces, makes private copies of the mount namespace and fresh IPC
and UTS namespaces, mounts /tmp, /var/tmp and /dev/shm (tmpfs made here per run, so that
the zygote can tell afterwards whether one filled up), /proc (its own processes only)
and its run directory at /task; then it drops to the slot user without privileges,
applies the limits and the seccomp filter, and runs the Python source in the warm
interpreter or execs the program.

The zygote is a child subreaper and buries whatever comes back to it. After a run's
child ends it checks that the slot's cgroup is empty (killing what it finds) before it
reports the end.
"""

from __future__ import annotations

import os
import sys
from typing import Any

# Namespace flags (clone/unshare/setns).
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
# mount(2) flags.
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2
# The new mount API (the same numbers on every architecture).
SYS_MOVE_MOUNT = 429
SYS_FSOPEN = 430
SYS_FSCONFIG = 431
SYS_FSMOUNT = 432
FSOPEN_CLOEXEC = 0x1
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
FSMOUNT_CLOEXEC = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOVE_MOUNT_F_EMPTY_PATH = 0x4
AT_FDCWD = -100
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
# prctl(2).
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NAME = 15
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38

TASK_DIR = "/task"  # where a run sees its directory
RUNS_DIR = "/.runs"  # the slot's run directories inside its root, hidden from each run
TMPFS_TARGETS = ("/tmp", "/var/tmp", "/dev/shm")  # noqa: S108 - inside the run's root
DEVICES = ("null", "zero", "full", "random", "urandom")
DEV_LINKS = {
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
}
# Top-level paths a root needs as the host has them (merged /usr: symbolic links).
SYSTEM_PATHS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/usr")
ROOT_SIZE = "size=1m,nr_inodes=1024,mode=0755"
HOSTNAME = b"sandbox"

# Imported before the first fork, so that programs (and the bootstrap) find them warm.
WARM_MODULES = [
    "fcntl",
    "resource",
    "atexit",
    "collections",
    "datetime",
    "functools",
    "heapq",
    "itertools",
    "json",
    "linecache",
    "math",
    "random",
    "re",
    "select",
    "string",
    "textwrap",
    "threading",
    "time",
    "traceback",
]

WARM_UP = """
import json, sys
def f(x: int) -> str:
    return f"{x!r} {[i for i in range(x)]} {data}"
print(json.dumps(f(3)), file=sys.stdout)
"""


def _load_bootstrap() -> Any:
    """The bootstrap module: a sibling file (`-I` leaves this directory off sys.path)."""
    try:
        from workers.sandbox.child import bootstrap  # imported as a package (tests)

        return bootstrap
    except ImportError:
        import importlib.util

        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bootstrap.py")
        spec = importlib.util.spec_from_file_location("taskledger_bootstrap", path)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


class Failure(Exception):
    """A request the zygote could not carry out; the message goes back to the worker."""


class Slot:
    """What the zygote keeps of a prepared slot."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.uid: int | None = None
        self.gid: int | None = None
        self.mnt: int | None = None  # the slot root's mount namespace
        self.net: int | None = None  # its empty network namespace
        self.cgroups: list[int] = []  # cgroup.procs, open for writing
        self.cgroup_procs: list[str] = []  # the same files' paths, to read back
        self.seccomp: bytes | None = None
        self.runs_dir: str | None = None  # the host tmpfs of its run directories
        self.tmp_options = ""


class Run:
    def __init__(self, run_id: int, slot: Slot, tmpfs: list[int], status: int) -> None:
        self.id = run_id
        self.slot = slot
        self.tmpfs = tmpfs  # detached tmpfs mounts (descriptors) for TMPFS_TARGETS
        self.status = status  # where the run's init writes the program's wait status


class Zygote:
    def __init__(self, control_fd: int) -> None:
        import ctypes
        import selectors
        import signal
        import socket

        self.bootstrap = _load_bootstrap()
        for name in WARM_MODULES:
            __import__(name)
        # The first compile() of a process sets up the parser: ~1 ms a child would pay.
        compile(WARM_UP, "main.py", "exec", dont_inherit=True)
        import json

        json.loads('{"a": [1, 2.5, "x", null, true]}')
        import gc

        gc.freeze()  # what is here now is never collected: children copy fewer pages
        self.ctypes = ctypes
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.mount.argtypes = [
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_ulong,
            ctypes.c_char_p,
        ]
        self.libc.syscall.restype = ctypes.c_long
        self.control = socket.socket(fileno=control_fd)
        self.pid = os.getpid()
        self.own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self.slots: dict[int, Slot] = {}
        self.runs: dict[int, Run] = {}  # pid -> run
        self.ended: list[tuple[int, int]] = []  # (pid, wait status) of runs, to report
        # A child checks this pipe's read end before the program starts: at EOF the
        # zygote is gone (its death signal to the child may have come too early).
        self.lifeline, self._lifeline_w = os.pipe()
        # SIGCHLD wakes the selector through this pipe.
        self.wakeup_r, wakeup_w = os.pipe()
        os.set_blocking(self.wakeup_r, False)
        os.set_blocking(wakeup_w, False)
        signal.set_wakeup_fd(wakeup_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self._prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans of programs come back to us
        self.libc.prctl(PR_SET_NAME, b"tl-zygote", 0, 0, 0)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.control, selectors.EVENT_READ, "control")
        self.selector.register(self.wakeup_r, selectors.EVENT_READ, "child")

    # -- system calls ------------------------------------------------------------------

    def _check(self, result: int, what: str) -> int:
        if result < 0:
            error = self.ctypes.get_errno()
            raise OSError(error, f"{what}: {os.strerror(error)}")
        return result

    def _prctl(self, option: int, value: int) -> None:
        self._check(self.libc.prctl(option, value, 0, 0, 0), f"prctl({option})")

    def _mount(
        self, source: str | None, target: str, fstype: str | None, flags: int, data: str = ""
    ) -> None:
        self._check(
            self.libc.mount(
                source.encode() if source else None,
                target.encode(),
                fstype.encode() if fstype else None,
                flags,
                data.encode() if data else None,
            ),
            f"mount {source or fstype} on {target}",
        )

    def _umount(self, target: str) -> None:
        self._check(self.libc.umount2(target.encode(), MNT_DETACH), f"umount {target}")

    def _setns(self, fd: int, kind: int, what: str) -> None:
        self._check(self.libc.setns(fd, kind), f"setns({what})")

    def _tmpfs(self, options: str) -> int:
        """A new, detached tmpfs (a descriptor that move_mount attaches)."""
        syscall = self.libc.syscall
        fs = self._check(syscall(SYS_FSOPEN, b"tmpfs", FSOPEN_CLOEXEC), "fsopen(tmpfs)")
        try:
            for option in options.split(","):
                key, _, value = option.partition("=")
                self._check(
                    syscall(SYS_FSCONFIG, fs, FSCONFIG_SET_STRING, key.encode(), value.encode(), 0),
                    f"fsconfig {option}",
                )
            self._check(syscall(SYS_FSCONFIG, fs, FSCONFIG_CMD_CREATE, None, None, 0), "fsconfig")
            flags = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
            return self._check(syscall(SYS_FSMOUNT, fs, FSMOUNT_CLOEXEC, flags), "fsmount")
        finally:
            os.close(fs)

    # -- the loop ----------------------------------------------------------------------

    def serve(self) -> None:
        import json as json_module
        import socket

        while True:
            for key, _ in self.selector.select():
                if key.data == "child":
                    while True:
                        try:
                            if not os.read(self.wakeup_r, 512):
                                break
                        except BlockingIOError:
                            break
                    self._reap()
                    continue
                message, fds, _, _ = socket.recv_fds(self.control, 1 << 20, 8)
                if not message:  # the worker is gone: so is everything we started
                    self._shut_down()
                    return
                request = json_module.loads(message)
                try:
                    if request["op"] == "prepare":
                        self._prepare(request)
                        self._send({"op": "prepared", "slot": request["slot"]})
                    elif request["op"] == "run":
                        self._start(request, fds)
                    elif request["op"] == "kill":
                        self._kill(request["id"])
                except Exception as error:  # noqa: BLE001 - the worker learns why; we go on
                    for fd in fds:
                        os.close(fd)
                    self._send({"op": "failed", **_ids(request), "message": str(error)})

    def _send(self, reply: dict[str, object]) -> None:
        import json

        self.control.send(json.dumps(reply).encode())

    def _shut_down(self) -> None:
        import signal

        for pid in self.runs:
            try:  # noqa: SIM105 - no contextlib import in the zygote
                os.kill(pid, signal.SIGKILL)  # pid 1 of its namespace: all of it dies
            except ProcessLookupError:
                pass
        for slot in self.slots.values():
            if slot.runs_dir is not None:
                try:  # noqa: SIM105
                    self._umount(slot.runs_dir)
                except OSError:
                    pass

    # -- preparing a slot --------------------------------------------------------------

    def _prepare(self, request: dict[str, object]) -> None:
        number = request["slot"]
        assert isinstance(number, int)
        old = self.slots.pop(number, None)
        if old is not None:
            self._release(old)
        slot = Slot(number)
        uid, gid = request["uid"], request["gid"]
        assert isinstance(uid, int)
        assert isinstance(gid, int)
        slot.uid, slot.gid = uid, gid
        tmp_bytes, tmp_files = request["tmp_bytes"], request["tmp_files"]
        slot.tmp_options = f"size={tmp_bytes},nr_inodes={tmp_files},mode=1777"
        seccomp = request.get("seccomp")
        if isinstance(seccomp, str):
            import base64

            slot.seccomp = base64.b64decode(seccomp)
        try:
            runs_dir = request["runs_dir"]
            assert isinstance(runs_dir, str)
            options = f"size={tmp_bytes},nr_inodes={tmp_files},mode=0711"
            self._mount_runs_dir(runs_dir, options, fresh=bool(request.get("fresh", True)))
            slot.runs_dir = runs_dir
            slot.net = self._new_namespace(CLONE_NEWNET, "net")
            slot.mnt = self._build_root(request)
            procs = request["cgroup_procs"]
            assert isinstance(procs, list)
            for path in procs:
                slot.cgroups.append(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
                slot.cgroup_procs.append(path)
            os.close(self._tmpfs(slot.tmp_options))  # the new mount API works here
        except BaseException:
            self._release(slot)
            raise
        self.slots[number] = slot

    def _release(self, slot: Slot) -> None:
        for fd in (slot.mnt, slot.net, *slot.cgroups):
            if fd is not None:
                os.close(fd)
        slot.mnt = slot.net = None
        slot.cgroups = []

    def _mount_runs_dir(self, path: str, options: str, *, fresh: bool) -> None:
        """A fresh tmpfs for the slot's run directories; a stale one (its worker was
        killed) is unmounted first, and what its runs left goes with it. Not `fresh` (a
        zygote replacing one that died): the one there is kept, with its run directories."""
        os.makedirs(path, mode=0o711, exist_ok=True)
        if not fresh and os.path.ismount(path):
            return
        for _ in range(64):  # mounts may be stacked by earlier workers
            if not os.path.ismount(path):
                break
            self._umount(path)
        self._mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, options)

    def _new_namespace(self, kind: int, name: str) -> int:
        """A descriptor of a new, empty namespace of `kind` (made in a forked helper:
        this process keeps its own)."""
        return self._in_helper(
            lambda: self._check(self.libc.unshare(kind), f"unshare {name}"), name
        )

    def _in_helper(self, build: object, name: str) -> int:
        """Run `build` in a forked helper that then waits; return a descriptor of the
        helper's namespace `name` (mnt or net), which outlives the helper."""
        import json

        report_r, report_w = os.pipe()
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            status = 0
            try:
                os.close(report_r)
                os.close(go_w)
                build()  # type: ignore[operator]
                os.write(report_w, b"{}")
            except BaseException as error:  # noqa: BLE001 - reported to the zygote
                os.write(report_w, json.dumps({"error": str(error)}).encode())
                status = 1
            finally:
                os.close(report_w)
                os.read(go_r, 1)
                os._exit(status)
        os.close(report_w)
        os.close(go_r)
        try:
            answer = json.loads(os.read(report_r, 1 << 16) or b'{"error": "the helper died"}')
            if "error" in answer:
                raise Failure(answer["error"])
            return os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            os.close(report_r)
            os.close(go_w)
            os.waitpid(pid, 0)

    def _build_root(self, request: dict[str, object]) -> int:
        """The slot's root as a mount namespace (see the module docstring)."""
        stage = request["stage_dir"]
        binds = request["binds"]
        etc = request["etc"]
        runs_dir = request["runs_dir"]
        assert isinstance(stage, str)
        assert isinstance(runs_dir, str)
        assert isinstance(binds, list)
        assert isinstance(etc, dict)
        os.makedirs(stage, mode=0o700, exist_ok=True)
        machine = os.uname().machine
        if machine not in SYS_PIVOT_ROOT:
            raise Failure(f"no pivot_root system call number known for {machine}")

        def build() -> None:
            self._check(self.libc.unshare(CLONE_NEWNS), "unshare mnt")
            self._mount(None, "/", None, MS_REC | MS_PRIVATE)
            self._mount("tmpfs", stage, "tmpfs", MS_NOSUID | MS_NODEV, ROOT_SIZE)
            for path in [*SYSTEM_PATHS, *binds]:
                assert isinstance(path, str)
                self._bind_read_only(path, stage + path)
            for name, text in etc.items():
                assert isinstance(text, str)
                with open(f"{stage}/etc/{name}", "w", encoding="utf-8") as file:
                    file.write(text)
            os.makedirs(f"{stage}/dev/shm", exist_ok=True)  # noqa: S108 - in the new root
            for device in DEVICES:
                target = f"{stage}/dev/{device}"
                open(target, "w").close()
                self._mount(f"/dev/{device}", target, None, MS_BIND)
            for name, target in DEV_LINKS.items():
                os.symlink(target, f"{stage}/dev/{name}")
            for directory in ("proc", "tmp", "var/tmp", TASK_DIR[1:], RUNS_DIR[1:]):
                os.makedirs(f"{stage}/{directory}", exist_ok=True)
            self._mount(runs_dir, stage + RUNS_DIR, None, MS_BIND)
            os.chdir(stage)
            pivot = SYS_PIVOT_ROOT[machine]
            self._check(self.libc.syscall(pivot, b".", b"."), "pivot_root")
            self._umount(".")  # the old root, now stacked under the new one
            os.chdir("/")
            self._mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)

        return self._in_helper(build, "mnt")

    def _bind_read_only(self, source: str, target: str) -> None:
        """`source` at `target`: a symbolic link copied, a file or directory bound
        read-only (nosuid, nodev); nothing if it does not exist."""
        if os.path.islink(source):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if not os.path.lexists(target):
                os.symlink(os.readlink(source), target)
            return
        if os.path.isdir(source):
            os.makedirs(target, exist_ok=True)
        elif os.path.exists(source):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "w").close()
        else:
            return
        self._mount(source, target, None, MS_BIND | MS_REC)
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
        self._mount(None, target, None, flags)

    # -- runs --------------------------------------------------------------------------

    def _start(self, request: dict[str, object], fds: list[int]) -> None:
        number = request["slot"]
        run_id = request["id"]
        assert isinstance(number, int)
        assert isinstance(run_id, int)
        slot = self.slots.get(number)
        if slot is None:
            raise Failure(f"slot {number} is not prepared")
        tmpfs = [self._tmpfs(slot.tmp_options) for _ in TMPFS_TARGETS]
        status_r, status_w = os.pipe()
        try:
            # The next child is pid 1 of a new namespace; ours stays, and so must the
            # namespace of our later children: set back at once (in the parent only).
            self._check(self.libc.unshare(CLONE_NEWPID), "unshare pid")
            try:
                pid = os.fork()
            except BaseException:
                self._setns(self.own_pid_ns, CLONE_NEWPID, "own pid")
                raise
            if pid != 0:
                self._setns(self.own_pid_ns, CLONE_NEWPID, "own pid")
        except BaseException:
            for fd in (*tmpfs, status_r, status_w):
                os.close(fd)
            raise
        if pid == 0:
            try:
                self._child(slot, request, fds, tmpfs, status_w)
            except BaseException:  # noqa: BLE001 - say why on stderr; never return to the loop
                import traceback

                traceback.print_exc()
            finally:
                os._exit(127)
        for fd in (*fds, status_w):
            os.close(fd)
        os.set_blocking(status_r, False)
        self.runs[pid] = Run(run_id, slot, tmpfs, status_r)
        self._send({"op": "started", "id": run_id, "pid": pid})

    def _kill(self, run_id: int) -> None:
        import signal

        for pid, run in self.runs.items():
            if run.id == run_id:
                try:  # noqa: SIM105 - no contextlib import in the zygote
                    os.kill(pid, signal.SIGKILL)  # pid 1 of its namespace: all of it dies
                except ProcessLookupError:
                    pass

    def _reap(self) -> None:
        """Bury every child that ended; for each run among them, see that its slot's
        cgroup is empty and report its end."""
        self._bury()
        while self.ended:
            pid, status = self.ended.pop(0)
            run = self.runs.pop(pid)
            full = []
            for target, fd in zip(TMPFS_TARGETS, run.tmpfs, strict=True):
                try:
                    usage = os.fstatvfs(fd)
                    if usage.f_bavail == 0 or usage.f_favail == 0:
                        full.append(target)
                finally:
                    os.close(fd)
            clean = self._empty_cgroup(run.slot)
            try:
                reported = os.read(run.status, 4)
            except BlockingIOError:
                reported = b""  # init was killed (deadline, cancel): its own status says so
            finally:
                os.close(run.status)
            if len(reported) == 4:
                status = int.from_bytes(reported, "little", signed=True)
            returncode = os.waitstatus_to_exitcode(status)
            self._send(
                {
                    "op": "exited",
                    "id": run.id,
                    "returncode": returncode,
                    "clean": clean,
                    "full": full,
                }
            )

    def _bury(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.runs:
                self.ended.append((pid, status))
            # else an orphan that came back to us (we are a subreaper): buried

    def _empty_cgroup(self, slot: Slot) -> bool:
        """Kill whatever is still in the slot's cgroup (nothing, when the PID namespace
        did its work) and wait for it to go; False if it would not."""
        import signal
        import time

        if not slot.cgroup_procs:
            return True  # no cgroups: the PID namespace is all there is
        give_up = time.monotonic() + 5
        while True:
            pids: set[int] = set()
            for path in slot.cgroup_procs:
                try:
                    with open(path, "rb") as procs:
                        pids.update(int(pid) for pid in procs.read().split())
                except OSError:
                    return False
            if not pids:
                return True
            if time.monotonic() > give_up:
                return False
            for pid in pids:
                try:  # noqa: SIM105
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.0005)
            self._bury()

    def _child(
        self,
        slot: Slot,
        request: dict[str, object],
        fds: list[int],
        tmpfs: list[int],
        status_w: int,
    ) -> None:
        """In the forked child, pid 1 of its own PID namespace: enter the sandbox, then
        start the program and be its init. Never returns normally."""
        import fcntl
        import resource
        import select
        import signal

        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        self._prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        os.setsid()
        for procs in slot.cgroups:
            os.write(procs, b"0")  # this process, and all it will start
        assert slot.net is not None
        assert slot.mnt is not None
        self._setns(slot.net, CLONE_NEWNET, "net")
        self._setns(slot.mnt, CLONE_NEWNS, "mnt")  # now / is the slot's root
        self._check(
            self.libc.unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS), "unshare mnt ipc uts"
        )
        self._check(self.libc.sethostname(HOSTNAME, len(HOSTNAME)), "sethostname")
        for target, fd in zip(TMPFS_TARGETS, tmpfs, strict=True):
            self._check(
                self.libc.syscall(
                    SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, target.encode(), MOVE_MOUNT_F_EMPTY_PATH
                ),
                f"move_mount {target}",
            )
        self._mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        name = request["run_dir"]
        assert isinstance(name, str)
        if not name or "/" in name or name.startswith("."):
            raise Failure(f"bad run directory name {name!r}")
        self._mount(f"{RUNS_DIR}/{name}", TASK_DIR, None, MS_BIND)
        self._mount(None, TASK_DIR, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV)
        self._umount(RUNS_DIR)  # the slot's other run directories are not this run's
        os.chdir(TASK_DIR)
        assert slot.uid is not None
        assert slot.gid is not None
        os.setgroups([])
        os.setresgid(slot.gid, slot.gid, slot.gid)
        os.setresuid(slot.uid, slot.uid, slot.uid)
        self._prctl(PR_SET_NO_NEW_PRIVS, 1)
        self._prctl(PR_SET_DUMPABLE, 1)  # /proc/self is the program's, as after exec
        self._prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # (setuid cleared it)
        if select.select([self.lifeline], [], [], 0)[0]:
            return  # the zygote died before our death signal was armed again
        # The run's descriptors and the status pipe, above any number they will go to.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]
        status = fcntl.fcntl(status_w, fcntl.F_DUPFD_CLOEXEC, 100)
        if slot.seccomp is not None:
            self._seccomp(slot.seccomp)  # for this process and the program alike
        program = os.fork()
        if program != 0:
            self._init(program, status)
        # The program: pid 2, a child of the namespace's init like everything it starts.
        for number, fd in enumerate(high):
            os.dup2(fd, number)
        os.closerange(len(high), 1 << 16)
        limits = request["limits"]
        assert isinstance(limits, dict)
        for limit, (soft, hard) in limits.items():
            resource.setrlimit(getattr(resource, limit), (soft, hard))
        env = request["env"]
        assert isinstance(env, dict)
        os.environ.clear()
        os.environ.update(env)
        argv = request["argv"]
        if isinstance(argv, list):
            # What Python ignores for itself, a program it execs gets back.
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
            signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
            try:
                os.execvpe(argv[0], argv, env)  # noqa: S606 - argv is ours
            except OSError as error:
                print(f"cannot run {argv[0]}: {error}", file=sys.stderr)
            return
        self._python()

    def _init(self, program: int, status: int) -> None:
        """The run's init (pid 1): bury whatever ends, and end with the program, writing
        its wait status to `status` first. The program is not pid 1 itself because the
        kernel protects pid 1 from signals it does not handle: SIGXCPU and SIGXFSZ at a
        limit, SIGTERM sent to itself, would do nothing. When init ends, the kernel kills
        everything else in the namespace."""
        os.closerange(0, status)  # the output pipes are the program's alone
        os.closerange(status + 1, 1 << 16)
        while True:
            try:
                pid, wait_status = os.waitpid(-1, 0)
            except ChildProcessError:
                os._exit(0)
            if pid == program:
                os.write(status, wait_status.to_bytes(4, "little", signed=True))
                os._exit(0)

    def _seccomp(self, bpf: bytes) -> None:
        import ctypes

        class Program(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

        code = ctypes.create_string_buffer(bpf, len(bpf))
        program = Program(len(bpf) // 8, ctypes.addressof(code))
        result = self.libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(program), 0, 0)
        self._check(result, "seccomp")

    def _python(self) -> None:
        bootstrap = self.bootstrap
        try:
            status = bootstrap.run_python(3, 4)
        except SystemExit as error:
            status = bootstrap._exit_status(error)
        # What the interpreter does at exit: join threads, run atexit, flush.
        try:
            threading = sys.modules.get("threading")
            if threading is not None:
                threading._shutdown()
            import atexit

            atexit._run_exitfuncs()
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    status = status or 120
            os._exit(status)


def _ids(request: dict[str, object]) -> dict[str, object]:
    return {key: request[key] for key in ("id", "slot") if key in request}


def _main(argv: list[str]) -> None:
    if argv[1:2] == ["serve"] and len(argv) == 3:
        Zygote(int(argv[2])).serve()
        return
    raise SystemExit(f"usage: zygote.py serve CONTROL_FD; got {argv[1:]}")


if __name__ == "__main__":
    _main(sys.argv)
