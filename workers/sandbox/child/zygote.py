"""The zygote: a warm, single-threaded root interpreter that builds its slot's sandbox
once and forks one child per run into it. Each slot has its own zygote.

Standard library only. The worker starts it as

    python -I -S .../workers/sandbox/child/zygote.py serve CONTROL_FD

(`-I -S`: neither the project nor a virtualenv is on its path; it loads its siblings
`kernel.py`, `slots.py`, `runner.py` and `bootstrap.py` from beside itself) and talks to
it over CONTROL_FD, a SOCK_SEQPACKET socket: JSON requests, the run's descriptors
attached (SCM_RIGHTS), JSON replies. Its process name is `tl-zygote` (`pgrep tl-zygote`).

Once (`prepare`, see `slots.py`): the host tmpfs of the slot's run directories, its root as
a mount namespace, its empty network namespace; then the zygote moves itself into the
slot's cgroups, so that every run is born there.

Per run (`run`): the zygote unshares a PID namespace for its next child and forks. The
child is pid 1 there: when it ends, the kernel kills everything else in the namespace, so
nothing a run started outlives it. The child (`runner.py`) enters the slot's sandbox,
with tmpfs /tmp, /var/tmp and /dev/shm made here per run (so that the zygote can tell
afterwards whether one filled up). Python source then runs in that process, in the warm
interpreter; an executable (mcs, mono) is spawned as pid 2, the child staying as its
init.

The zygote is a child subreaper and buries whatever comes back to it. After a run's
child ends it checks that the slot's cgroup holds nothing but itself (killing what it
finds) before it reports the end.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

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


def _siblings() -> tuple[Any, Any, Any]:
    """kernel, runner, slots: this directory's modules. Run as a script (`-I` leaves
    this directory off sys.path), they are loaded as a package of their own, whose
    modules import each other relatively."""
    import importlib
    import types

    package = types.ModuleType("taskledger_sandbox_child")
    package.__path__ = [os.path.dirname(os.path.abspath(__file__))]
    sys.modules[package.__name__] = package
    return tuple(  # type: ignore[return-value]
        importlib.import_module(f"{package.__name__}.{name}")
        for name in ("kernel", "runner", "slots")
    )


if TYPE_CHECKING or __package__:
    from workers.sandbox.child import kernel, runner, slots
else:
    kernel, runner, slots = _siblings()


class Run:
    def __init__(self, run_id: int, slot: slots.Slot, tmpfs: list[int], status: int) -> None:
        self.id = run_id
        self.slot = slot
        self.tmpfs = tmpfs  # detached tmpfs mounts (descriptors) for runner.TMPFS_TARGETS
        self.status = status  # where the run's init writes the program's wait status


class ZygoteServer:
    """The zygote process's side: serves the worker's `ZygoteClient` over CONTROL_FD."""

    def __init__(self, control_fd: int) -> None:
        import selectors
        import signal
        import socket

        for name in WARM_MODULES:
            __import__(name)
        # The first compile() of a process sets up the parser: ~1 ms a child would pay.
        compile(WARM_UP, "main.py", "exec", dont_inherit=True)
        import json

        json.loads('{"a": [1, 2.5, "x", null, true]}')
        import gc

        gc.freeze()  # what is here now is never collected: children copy fewer pages
        self.kernel = kernel.Kernel()
        self.control = socket.socket(fileno=control_fd)
        self.own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self.slot: slots.Slot | None = None  # the one slot this zygote serves
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
        # Orphans of programs come back to us.
        self.kernel.prctl(kernel.PR_SET_CHILD_SUBREAPER, 1)
        self.kernel.set_name(b"tl-zygote")
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.control, selectors.EVENT_READ, "control")
        self.selector.register(self.wakeup_r, selectors.EVENT_READ, "child")

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

    def _prepare(self, request: dict[str, object]) -> None:
        """Prepare this zygote's slot (one per zygote) and move into its cgroups: every
        run is then born there, and nothing pays for moving a process into a cgroup (an
        RCU grace period, ~13 ms on a small VM). The OOM killer is to leave the zygote
        alone: -1000 where we may set it, and its runs get +500."""
        old, self.slot = self.slot, None
        if old is not None:
            if old.number != request["slot"]:
                self.slot = old
                raise slots.Failure("a zygote serves one slot")
            old.release()
        slot = slots.prepare(self.kernel, request)
        try:
            for procs in slot.cgroups:
                os.write(procs, b"0")
        except BaseException:
            slot.release()
            raise
        try:
            with open("/proc/self/oom_score_adj", "w") as score:
                score.write("-1000")
        except PermissionError:
            pass  # no CAP_SYS_RESOURCE (a container): the runs' +500 must do
        self.slot = slot

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
        if self.slot is not None and self.slot.runs_dir is not None:
            try:  # noqa: SIM105
                self.kernel.umount(self.slot.runs_dir)
            except OSError:
                pass

    # -- runs --------------------------------------------------------------------------

    def _start(self, request: dict[str, object], fds: list[int]) -> None:
        number = request["slot"]
        run_id = request["id"]
        assert isinstance(number, int)
        assert isinstance(run_id, int)
        slot = self.slot
        if slot is None or slot.number != number:
            raise slots.Failure(f"slot {number} is not prepared")
        tmpfs = [self.kernel.tmpfs(slot.tmp_options) for _ in runner.TMPFS_TARGETS]
        status_r, status_w = os.pipe()
        try:
            # The next child is pid 1 of a new namespace; ours stays, and so must the
            # namespace of our later children: set back at once (in the parent only).
            self.kernel.unshare(kernel.CLONE_NEWPID, "pid")
            try:
                pid = os.fork()
            except BaseException:
                self.kernel.setns(self.own_pid_ns, kernel.CLONE_NEWPID, "own pid")
                raise
            if pid != 0:
                self.kernel.setns(self.own_pid_ns, kernel.CLONE_NEWPID, "own pid")
        except BaseException:
            for fd in (*tmpfs, status_r, status_w):
                os.close(fd)
            raise
        if pid == 0:
            try:
                runner.enter_and_run(
                    self.kernel, self.lifeline, slot, request, fds, tmpfs, status_w
                )
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
            for target, fd in zip(runner.TMPFS_TARGETS, run.tmpfs, strict=True):
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

    def _empty_cgroup(self, slot: slots.Slot) -> bool:
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
            pids.discard(os.getpid())  # the zygote lives in its slot's cgroups
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


def _ids(request: dict[str, object]) -> dict[str, object]:
    return {key: request[key] for key in ("id", "slot") if key in request}


def _main(argv: list[str]) -> None:
    if argv[1:2] == ["serve"] and len(argv) == 3:
        ZygoteServer(int(argv[2])).serve()
        return
    raise SystemExit(f"usage: zygote.py serve CONTROL_FD; got {argv[1:]}")


if __name__ == "__main__":
    _main(sys.argv)
