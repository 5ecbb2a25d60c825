"""A run's own process (standard library only): forked by the zygote (`zygote.py`) as pid 1
of a new PID namespace, it enters its slot's sandbox, then runs the program, Python in
itself, an executable as its child; either way it is the run's init.

It enters the slot's network and mount namespaces, makes private copies of the mount
namespace and fresh IPC and UTS namespaces, mounts /tmp, /var/tmp and /dev/shm (tmpfs the
zygote made for this run, so that it can tell afterwards whether one filled up), /proc
(its own processes only) and its run directory at /task; then it drops to the slot user
without privileges, applies the limits and loads the seccomp filter.
"""

from __future__ import annotations

import os
import sys

from . import bootstrap, kernel, slots

TMPFS_TARGETS = ("/tmp", "/var/tmp", "/dev/shm")  # noqa: S108 - inside the run's root
HOSTNAME = b"sandbox"
# Signals whose default action ends a process (other than the uncatchable and the
# synchronous faults, which the kernel delivers even to pid 1). SIGINT has Python's own.
TERMINATING_SIGNALS = (
    "SIGHUP",
    "SIGQUIT",
    "SIGABRT",
    "SIGUSR1",
    "SIGUSR2",
    "SIGALRM",
    "SIGTERM",
    "SIGXCPU",
    "SIGVTALRM",
    "SIGPROF",
)


def enter_and_run(
    k: kernel.Kernel,
    lifeline: int,
    slot: slots.Slot,
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
    k.prctl(kernel.PR_SET_PDEATHSIG, signal.SIGKILL)
    os.setsid()
    with open("/proc/self/oom_score_adj", "w") as score:
        score.write("500")  # at the memory limit (or the machine's), the run goes first
    assert slot.net is not None
    assert slot.mnt is not None
    k.setns(slot.net, kernel.CLONE_NEWNET, "net")
    k.setns(slot.mnt, kernel.CLONE_NEWNS, "mnt")  # now / is the slot's root
    k.unshare(kernel.CLONE_NEWNS | kernel.CLONE_NEWIPC | kernel.CLONE_NEWUTS, "mnt ipc uts")
    k.sethostname(HOSTNAME)
    for target, fd in zip(TMPFS_TARGETS, tmpfs, strict=True):
        k.move_mount(fd, target)
    k.mount("proc", "/proc", "proc", kernel.MS_NOSUID | kernel.MS_NODEV | kernel.MS_NOEXEC)
    name = request["run_dir"]
    assert isinstance(name, str)
    if not name or "/" in name or name.startswith("."):
        raise slots.Failure(f"bad run directory name {name!r}")
    k.mount(f"{slots.RUNS_DIR}/{name}", slots.TASK_DIR, None, kernel.MS_BIND)
    flags = kernel.MS_REMOUNT | kernel.MS_BIND | kernel.MS_NOSUID | kernel.MS_NODEV
    k.mount(None, slots.TASK_DIR, None, flags)
    k.umount(slots.RUNS_DIR)  # the slot's other run directories are not this run's
    os.chdir(slots.TASK_DIR)
    os.setgroups([])
    os.setresgid(slot.gid, slot.gid, slot.gid)
    os.setresuid(slot.uid, slot.uid, slot.uid)
    k.prctl(kernel.PR_SET_NO_NEW_PRIVS, 1)
    k.prctl(kernel.PR_SET_DUMPABLE, 1)  # /proc/self is the program's, as after exec
    k.prctl(kernel.PR_SET_PDEATHSIG, signal.SIGKILL)  # (setuid cleared it)
    if select.select([lifeline], [], [], 0)[0]:
        return  # the zygote died before our death signal was armed again
    # The run's descriptors and the status pipe, above any number they will go to.
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]
    status = fcntl.fcntl(status_w, fcntl.F_DUPFD_CLOEXEC, 100)
    limits = request["limits"]
    env = request["env"]
    argv = request["argv"]
    assert isinstance(limits, dict)
    assert isinstance(env, dict)
    for limit, (soft, hard) in limits.items():
        resource.setrlimit(getattr(resource, limit), (soft, hard))
    if slot.seccomp is not None:
        k.seccomp(slot.seccomp)  # for this process and all it starts
    if isinstance(argv, list):
        _be_init(argv, env, high, status)
    # Python: this process runs the program (pid 1 of the namespace).
    for number, fd in enumerate(high):
        os.dup2(fd, number)
    os.closerange(len(high), status)
    os.closerange(status + 1, 1 << 16)
    os.environ.clear()
    os.environ.update(env)
    _run_python(status)


def _be_init(argv: list[str], env: dict[str, str], fds: list[int], status: int) -> None:
    """Start an executable as pid 2 and be its init (pid 1): bury whatever ends, and
    end with the program, writing its wait status to `status` first. An executable is
    not pid 1 itself: the kernel protects pid 1 from the signals it does not handle
    (SIGXCPU at the CPU limit, SIGTERM sent to itself). posix_spawn (vfork and exec)
    costs no copy of this process. When init ends, the kernel kills everything else
    in the namespace."""
    import signal

    for number, fd in enumerate(fds):  # (posix_spawn's own dup2 checks the fd limit)
        os.dup2(fd, number)
    try:
        # What Python ignores for itself, the program gets back.
        default = (signal.SIGPIPE, signal.SIGXFSZ)
        program = os.posix_spawn(argv[0], argv, env, setsigdef=default)
    except OSError as error:
        os.write(2, f"cannot run {argv[0]}: {error}\n".encode())
        os._exit(127)
    os.closerange(0, status)  # the output pipes are the program's alone
    os.closerange(status + 1, 1 << 16)
    while True:
        try:
            pid, wait_status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(127)
        if pid == program:
            os.write(status, wait_status.to_bytes(4, "little", signed=True))
            os._exit(0)


def _run_python(status_fd: int) -> None:
    """Run the Python program in this process, pid 1 of the run's namespace.

    The kernel protects pid 1 from signals it does not handle: a signal whose default
    is to end the process (SIGTERM sent by the program to itself, SIGALRM, SIGXCPU at
    the CPU limit) would do nothing. Handlers do what the default would, and tell the
    zygote through `status_fd` that the program was killed by that signal. A fork
    less per run than keeping an init beside the program; its orphans stay unburied
    (they count against the process limit) until the run ends."""
    import signal

    def killed(signum: int, frame: object) -> None:
        os.write(status_fd, signum.to_bytes(4, "little", signed=True))
        os._exit(128 + signum)

    for name in TERMINATING_SIGNALS:
        signal.signal(getattr(signal, name), killed)
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
