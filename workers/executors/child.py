"""What runs on the sandbox's interpreter: the Python bootstrap, and the zygote.

This file imports the standard library only: it is handed to `python -I -S -c`, which
sees neither the project nor its virtualenv (and the slot user may not be able to read
either). Two ways in:

    python -I -S -c <the part above "the zygote"> CODE_FD REPORT_FD   (spawned program)
    python -I -S -c <this source> zygote CONTROL_FD   (as root; forks programs)

The bootstrap (`run_python`) sees:

- fd 0: a memfd holding the task's data as JSON (the program may read it as stdin; the
  bootstrap reads it with pread, so the program still sees it from the start);
- CODE_FD: a memfd holding the program's source (UTF-8), closed once read;
- REPORT_FD: a pipe to the worker: one JSON line when the program did not compile
  (`compile_error`) or raised an uncaught exception (`exception`), with the last line of
  the traceback as `message`. It is not inherited by the program's children.

The zygote is a pre-started, pre-imported, single-threaded interpreter that forks one
child per run: the child puts itself in the sandbox (new session, the slot's network
namespace, resource limits, the slot user, no new privileges) and either runs Python
source in the already warm interpreter or execs a program. The worker talks to it over a
SOCK_SEQPACKET socket: JSON requests with the run's file descriptors attached, JSON
replies. It buries everything (it is a child subreaper) and, after each run, kills
whatever the slot's user left behind before it reports the end.
"""

from __future__ import annotations

import builtins
import os
import sys

# json, traceback and linecache are imported only when a program fails: a spawned
# interpreter pays for every import before the program starts (json alone ~8 ms here).

FILENAME = "main.py"


def _report(report_fd: int, kind: str, message: str) -> None:
    import json

    line = json.dumps({"kind": kind, "message": message}) + "\n"
    try:  # noqa: SIM105 - contextlib would be one more import before every program
        os.write(report_fd, line.encode("utf-8", "replace"))
    except OSError:  # the program closed it: the worker falls back to the exit status
        pass


def _read_data() -> object:
    try:
        size = os.fstat(0).st_size
        raw = os.pread(0, size, 0).decode("utf-8")
        return parse_json(raw) if raw.strip() else None
    except (OSError, ValueError):
        return None


def parse_json(text: str) -> object:
    """json.loads, without importing json where it is not imported yet: its C scanner
    with json's own defaults (the module's regular expressions are what costs)."""
    if "json" in sys.modules:
        return sys.modules["json"].loads(text)
    import _json

    class Defaults:
        strict = True
        object_hook = None
        object_pairs_hook = None
        parse_float = float
        parse_int = int
        parse_constant = {
            "NaN": float("nan"),
            "Infinity": float("inf"),
            "-Infinity": float("-inf"),
        }.__getitem__

    start = len(text) - len(text.lstrip())
    try:
        # typeshed types make_scanner's argument as a scanner; it is json's context.
        value, end = _json.make_scanner(Defaults)(text, start)  # type: ignore[arg-type]
    except StopIteration:
        raise ValueError("not JSON") from None
    if text[end:].strip():
        raise ValueError("extra data after the JSON value")
    return value


def run_python(code_fd: int, report_fd: int) -> int:
    """Compile and run the program as `__main__` with the global `data`; the exit code.

    `SystemExit` raised by the program propagates (the caller turns it into the exit
    status as the interpreter would)."""
    os.set_inheritable(report_fd, False)
    with open(code_fd, "rb") as code_file:
        text = code_file.read().decode("utf-8")
    data = _read_data()
    try:
        code = compile(text, FILENAME, "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as error:
        import traceback

        traceback.print_exception(type(error), error, None)
        _report(report_fd, "compile_error", _last_line(error))
        return 1
    module = type(sys)("__main__")
    module.__file__ = FILENAME
    module.__dict__.update(__builtins__=builtins, data=data)
    sys.modules["__main__"] = module
    sys.argv = [FILENAME]
    try:
        exec(code, module.__dict__)  # noqa: S102 - running the program is the point
    except SystemExit:
        raise
    except BaseException as error:  # noqa: BLE001 - any uncaught exception is the program's failure
        try:
            _print_traceback(error, text)
            _report(report_fd, "exception", _last_line(error))
        except MemoryError:  # the program holds all the memory it may have
            _report(report_fd, "exception", type(error).__name__)
        return 1
    return 0


def _print_traceback(error: BaseException, text: str) -> None:
    import linecache
    import traceback

    # Tracebacks show the program's lines without a file on disk.
    linecache.cache[FILENAME] = (len(text), None, text.splitlines(True), FILENAME)
    # Skip the bootstrap's frame: the traceback starts in the program.
    tb = error.__traceback__.tb_next if error.__traceback__ else None
    traceback.print_exception(type(error), error, tb)


def _last_line(error: BaseException) -> str:
    import traceback

    return traceback.format_exception_only(type(error), error)[-1].strip()


# -- the zygote (a spawned interpreter gets only what is above this line) ---------

CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
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
    "string",
    "textwrap",
    "threading",
    "time",
    "traceback",
]


def _uid(pid: int) -> int | None:
    """The real uid of a process, from /proc (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"Uid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _exit_status(error: SystemExit) -> int:
    """The exit status the interpreter gives an uncaught SystemExit."""
    if error.code is None:
        return 0
    if isinstance(error.code, int):
        return error.code
    print(error.code, file=sys.stderr)
    return 1


WARM_UP = """
import json, sys
def f(x: int) -> str:
    return f"{x!r} {[i for i in range(x)]} {data}"
print(json.dumps(f(3)), file=sys.stdout)
"""


class Zygote:
    def __init__(self, control_fd: int) -> None:
        import ctypes
        import selectors
        import signal
        import socket

        for name in WARM_MODULES:
            __import__(name)
        # The first compile() of a process sets up the parser: ~1 ms a child would pay.
        compile(WARM_UP, FILENAME, "exec", dont_inherit=True)
        import json

        json.loads('{"a": [1, 2.5, "x", null, true]}')
        import gc

        gc.freeze()  # what is here now is never collected: children copy fewer pages
        self.ctypes = ctypes
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.control = socket.socket(fileno=control_fd)
        self.pid = os.getpid()
        self.runs: dict[int, tuple[int, int | None]] = {}  # pid -> (run id, uid)
        self.ended: list[tuple[int, int]] = []  # (pid, wait status) of runs, to report
        self.netns: dict[int | None, int] = {}  # slot user -> its network namespace (fd)
        self.uids: set[int] = set()
        # SIGCHLD wakes the selector through this pipe.
        self.wakeup_r, wakeup_w = os.pipe()
        os.set_blocking(self.wakeup_r, False)
        os.set_blocking(wakeup_w, False)
        signal.set_wakeup_fd(wakeup_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self._prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans of programs come back to us
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.control, selectors.EVENT_READ, "control")
        self.selector.register(self.wakeup_r, selectors.EVENT_READ, "child")

    def _prctl(self, option: int, value: int) -> None:
        if self.libc.prctl(option, value, 0, 0, 0) != 0:
            raise OSError(self.ctypes.get_errno(), f"prctl({option})")

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
                message, fds, _, _ = socket.recv_fds(self.control, 1 << 16, 8)
                if not message:  # the worker is gone: so is everything we started
                    for uid in self.uids:
                        self._kill_uid(uid)
                    for pid in self.runs:
                        self._kill_group(pid)
                    return
                request = json_module.loads(message)
                if request["op"] == "run":
                    self._start(request, fds)
                elif request["op"] == "kill":
                    self._kill(request["id"])

    def _send(self, reply: dict[str, object]) -> None:
        import json

        self.control.send(json.dumps(reply).encode())

    def _start(self, request: dict[str, object], fds: list[int]) -> None:
        uid = request.get("uid")
        assert uid is None or isinstance(uid, int)
        if request["netns"]:
            request["netns"] = self._network_namespace(uid)
        pid = os.fork()
        if pid == 0:
            try:
                self._child(request, fds)
            except BaseException:  # noqa: BLE001 - say why on stderr; never return to the loop
                import traceback

                traceback.print_exc()
            finally:
                os._exit(127)
        for fd in fds:
            os.close(fd)
        if uid is not None:
            self.uids.add(uid)
        run_id = request["id"]
        assert isinstance(run_id, int)
        self.runs[pid] = (run_id, uid)
        self._send({"op": "started", "id": run_id, "pid": pid})

    def _network_namespace(self, uid: int | None) -> int:
        """A descriptor of the slot user's own empty network namespace, made on its first
        run: entering one (setns) costs microseconds, making one (unshare) milliseconds.
        Reusing it is safe because nothing of a run outlives it: without CAP_NET_ADMIN a
        program cannot configure the namespace, and what it can make there (sockets,
        abstract Unix addresses) dies with its processes."""
        fd = self.netns.get(uid)
        if fd is None:
            own = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if self.libc.unshare(CLONE_NEWNET) != 0:
                    raise OSError(self.ctypes.get_errno(), "unshare(CLONE_NEWNET)")
                fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            finally:
                if self.libc.setns(own, CLONE_NEWNET) != 0:
                    raise OSError(self.ctypes.get_errno(), "setns back")
                os.close(own)
            self.netns[uid] = fd
        return fd

    def _kill(self, run_id: int) -> None:
        import signal

        for pid, (rid, uid) in self.runs.items():
            if rid == run_id:
                self._kill_group(pid)
                try:  # noqa: SIM105 - no contextlib import in the zygote
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                if uid is not None:
                    self._kill_uid(uid)

    def _reap(self) -> None:
        """Bury every child that ended; for each run among them, clean its slot and
        report its end."""
        self._bury()
        while self.ended:
            pid, status = self.ended.pop(0)
            run_id, uid = self.runs.pop(pid)
            clean = self._clean(uid) if uid is not None else not self._kill_group(pid)
            returncode = os.waitstatus_to_exitcode(status)
            self._send({"op": "exited", "id": run_id, "returncode": returncode, "clean": clean})

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
            # else an orphan of some program (we are the subreaper): buried

    def _clean(self, uid: int) -> bool:
        """After a run of `uid` ended: kill whatever of `uid` is left and wait until it
        is gone. False if it could not be checked (the worker then looks in /proc)."""
        import time

        left = self._left(uid)
        if left == []:
            return True  # the common case: no fork, no kill
        self._kill_uid(uid)
        if left is None:
            return False
        give_up = time.monotonic() + 5
        while left != [] and time.monotonic() < give_up:
            time.sleep(0.0002)  # SIGKILL is on its way; the dying come here to be buried
            self._bury()
            left = self._left(uid)
        return left == []

    def _left(self, uid: int) -> list[int] | None:
        """Processes of `uid` still here, or None when this kernel cannot say.

        Every process a run starts descends from the zygote, and its orphans come to the
        zygote (the subreaper): once the run's own child has ended, whatever is left of
        its user is a child of the zygote, or the descendant of one with the same user."""
        try:
            with open(f"/proc/self/task/{self.pid}/children", "rb") as children:
                pids = [int(pid) for pid in children.read().split()]
        except OSError:
            return None
        return [pid for pid in pids if pid not in self.runs and _uid(pid) == uid]

    def _kill_group(self, pgid: int) -> bool:
        import signal

        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def _kill_uid(self, uid: int) -> None:
        """kill(-1, SIGKILL) as `uid`: every process of the user, atomically (under the
        kernel's task-list lock, so a fork bomb cannot outrun it)."""
        import signal

        pid = os.fork()
        if pid == 0:
            try:
                os.setresuid(uid, uid, uid)
                os.kill(-1, signal.SIGKILL)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)

    def _child(self, request: dict[str, object], fds: list[int]) -> None:
        """In the forked child: enter the sandbox, then run the program. Never returns."""
        import fcntl
        import resource
        import signal

        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        netns = request["netns"]
        # False (no isolation) is an int to isinstance; only a real descriptor counts.
        if type(netns) is int and self.libc.setns(netns, CLONE_NEWNET) != 0:
            raise OSError(self.ctypes.get_errno(), "setns(CLONE_NEWNET)")
        # Move the run's descriptors above any target number, then onto 0, 1, 2, ...
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]
        for target, fd in enumerate(high):
            os.dup2(fd, target)
        os.closerange(len(high), 1 << 16)
        cwd = request["cwd"]
        assert isinstance(cwd, str)
        os.chdir(cwd)
        limits = request["limits"]
        assert isinstance(limits, dict)
        for name, (soft, hard) in limits.items():
            resource.setrlimit(getattr(resource, name), (soft, hard))
        uid, gid = request["uid"], request["gid"]
        if isinstance(uid, int) and isinstance(gid, int):
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        self._prctl(PR_SET_NO_NEW_PRIVS, 1)
        self._prctl(PR_SET_DUMPABLE, 1)  # /proc/self is the program's, as after exec
        self._prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # (setuid cleared it)
        if os.getppid() != self.pid:
            return
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

    def _python(self) -> None:
        try:
            status = run_python(3, 4)
        except SystemExit as error:
            status = _exit_status(error)
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


def _main(argv: list[str]) -> None:
    if argv[1:2] == ["zygote"]:
        Zygote(int(argv[2])).serve()
        return
    if argv[1:2] == ["probe"]:
        print(os.getuid(), sys.executable)
        return
    raise SystemExit(f"usage: child.py zygote CONTROL_FD | probe; got {argv[1:]}")


if __name__ == "__main__":
    _main(sys.argv)
