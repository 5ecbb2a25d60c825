"""A slot, prepared once by the zygote (standard library only): the host tmpfs of its run
directories, its root as a mount namespace, its empty network namespace, its cgroups.

The root is a read-only tmpfs holding read-only bind mounts of what the languages need
(`/usr`, the interpreter's prefix, `/etc/mono`, …; symbolic links such as a merged
`/bin` copied as links), a small `/etc` written here, the devices `null`, `zero`, `full`,
`random`, `urandom`, and mount points for each run's `/proc`, `/tmp`, `/var/tmp`,
`/dev/shm` and `/task`. The slot's run directories are bound at `/.runs`, which each run
unmounts in its own copy once it has bound its directory at `/task`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

from .kernel import (
    CLONE_NEWNET,
    CLONE_NEWNS,
    MS_BIND,
    MS_NODEV,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    Kernel,
)

TASK_DIR = "/task"  # where a run sees its directory
RUNS_DIR = "/.runs"  # the slot's run directories inside its root, hidden from each run
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


class Failure(Exception):
    """A request the zygote could not carry out; the message goes back to the worker."""


class Slot:
    """What the zygote keeps of a prepared slot."""

    def __init__(self, number: int, uid: int, gid: int) -> None:
        self.number = number
        self.uid = uid
        self.gid = gid
        self.mnt: int | None = None  # the slot root's mount namespace
        self.net: int | None = None  # its empty network namespace
        self.cgroups: list[int] = []  # cgroup.procs, open for writing
        self.cgroup_procs: list[str] = []  # the same files' paths, to read back
        self.seccomp: object | None = None  # the compiled filter, for Kernel.seccomp
        self.runs_dir: str | None = None  # the host tmpfs of its run directories
        self.tmp_options = ""  # of each run's tmpfs

    def release(self) -> None:
        for fd in (self.mnt, self.net, *self.cgroups):
            if fd is not None:
                os.close(fd)
        self.mnt = self.net = None
        self.cgroups = []


def prepare(kernel: Kernel, request: dict[str, object]) -> Slot:
    """Build the slot the worker describes (see `workers.sandbox.Sandbox._slot_request`)."""
    number, uid, gid = request["slot"], request["uid"], request["gid"]
    tmp_bytes, tmp_files = request["tmp_bytes"], request["tmp_files"]
    runs_dir, procs = request["runs_dir"], request["cgroup_procs"]
    assert isinstance(number, int)
    assert isinstance(uid, int)
    assert isinstance(gid, int)
    assert isinstance(runs_dir, str)
    assert isinstance(procs, list)
    slot = Slot(number, uid, gid)
    slot.tmp_options = f"size={tmp_bytes},nr_inodes={tmp_files},mode=1777"
    seccomp = request.get("seccomp")
    if isinstance(seccomp, str):
        import base64

        slot.seccomp = kernel.seccomp_program(base64.b64decode(seccomp))
    try:
        options = f"size={tmp_bytes},nr_inodes={tmp_files},mode=0711"
        _mount_runs_dir(kernel, runs_dir, options, fresh=bool(request.get("fresh", True)))
        slot.runs_dir = runs_dir
        slot.net = _in_helper(lambda: kernel.unshare(CLONE_NEWNET, "net"), "net")
        slot.mnt = _build_root(kernel, request, runs_dir)
        for path in procs:
            slot.cgroups.append(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
            slot.cgroup_procs.append(path)
        os.close(kernel.tmpfs(slot.tmp_options))  # each run needs the new mount API
    except BaseException:
        slot.release()
        raise
    return slot


def _mount_runs_dir(kernel: Kernel, path: str, options: str, *, fresh: bool) -> None:
    """A fresh tmpfs for the slot's run directories; a stale one (its worker was killed)
    is unmounted first, and what its runs left goes with it. Not `fresh` (a zygote
    replacing one that died): the one there is kept, with its run directories."""
    os.makedirs(path, mode=0o711, exist_ok=True)
    if not fresh and os.path.ismount(path):
        return
    for _ in range(64):  # mounts may be stacked by earlier workers
        if not os.path.ismount(path):
            break
        kernel.umount(path)
    kernel.mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, options)


def _in_helper(build: Callable[[], None], name: str) -> int:
    """Run `build` in a forked helper that then waits; a descriptor of the helper's
    namespace `name` (mnt or net), which outlives the helper. This process keeps its own
    namespaces."""
    report_r, report_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 0
        try:
            os.close(report_r)
            os.close(go_w)
            build()
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


def _build_root(kernel: Kernel, request: dict[str, object], runs_dir: str) -> int:
    """The slot's root as a mount namespace (see the module docstring)."""
    stage, binds, etc = request["stage_dir"], request["binds"], request["etc"]
    assert isinstance(stage, str)
    assert isinstance(binds, list)
    assert isinstance(etc, dict)
    os.makedirs(stage, mode=0o700, exist_ok=True)

    def build() -> None:
        kernel.unshare(CLONE_NEWNS, "mnt")
        kernel.mount(None, "/", None, MS_REC | MS_PRIVATE)
        kernel.mount("tmpfs", stage, "tmpfs", MS_NOSUID | MS_NODEV, ROOT_SIZE)
        for path in [*SYSTEM_PATHS, *binds]:
            assert isinstance(path, str)
            _bind_read_only(kernel, path, stage + path)
        for name, text in etc.items():
            assert isinstance(text, str)
            with open(f"{stage}/etc/{name}", "w", encoding="utf-8") as file:
                file.write(text)
        os.makedirs(f"{stage}/dev/shm", exist_ok=True)  # noqa: S108 - in the new root
        for device in DEVICES:
            target = f"{stage}/dev/{device}"
            open(target, "w").close()  # a mount point
            kernel.mount(f"/dev/{device}", target, None, MS_BIND)
        for name, target in DEV_LINKS.items():
            os.symlink(target, f"{stage}/dev/{name}")
        for directory in ("proc", "tmp", "var/tmp", TASK_DIR[1:], RUNS_DIR[1:]):
            os.makedirs(f"{stage}/{directory}", exist_ok=True)
        kernel.mount(runs_dir, stage + RUNS_DIR, None, MS_BIND)
        kernel.pivot_root(stage)
        kernel.mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)

    return _in_helper(build, "mnt")


def _bind_read_only(kernel: Kernel, source: str, target: str) -> None:
    """`source` at `target`: a symbolic link copied, a file or directory bound read-only
    (nosuid, nodev); nothing if it does not exist."""
    if os.path.islink(source):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.lexists(target):
            os.symlink(os.readlink(source), target)
        return
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    elif os.path.exists(source):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "w").close()  # a mount point
    else:
        return
    kernel.mount(source, target, None, MS_BIND | MS_REC)
    kernel.mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
