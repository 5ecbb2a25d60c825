"""What runs inside the sandbox, on the sandboxed interpreter: the Python bootstrap.

This file imports the standard library only: it is handed to `python -I -S -c`, which
sees neither the project nor its virtualenv (and the slot user may not be able to read
either). The worker passes it its file descriptors on the command line:

    python -I -S -c <this source> run CODE_FD REPORT_FD

- fd 0 is a memfd holding the task's data as JSON (the program may read it as stdin; the
  bootstrap reads it with pread, so the program still sees it from the start);
- CODE_FD is a memfd holding the program's source (UTF-8), closed once read;
- REPORT_FD is a pipe to the worker: one JSON line when the program did not compile
  (`compile_error`) or raised an uncaught exception (`exception`), with the last line of
  the traceback as `message`. It is not inherited by the program's children.
"""

from __future__ import annotations

import builtins
import json
import os
import sys

# traceback and linecache are imported only when a program fails: a spawned interpreter
# pays for every import before the program starts.

FILENAME = "main.py"


def _report(report_fd: int, kind: str, message: str) -> None:
    line = json.dumps({"kind": kind, "message": message}) + "\n"
    try:  # noqa: SIM105 - contextlib would be one more import before every program
        os.write(report_fd, line.encode("utf-8", "replace"))
    except OSError:  # the program closed it: the worker falls back to the exit status
        pass


def _read_data() -> object:
    try:
        size = os.fstat(0).st_size
        raw = os.pread(0, size, 0)
        return json.loads(raw) if raw else None
    except (OSError, ValueError):
        return None


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


def _main(argv: list[str]) -> None:
    if argv[1:2] == ["run"]:
        raise SystemExit(run_python(int(argv[2]), int(argv[3])))
    if argv[1:2] == ["probe"]:
        print(json.dumps({"uid": os.getuid(), "executable": sys.executable}))
        return
    raise SystemExit(f"usage: child.py run CODE_FD REPORT_FD | probe (got {argv[1:]})")


if __name__ == "__main__":
    _main(sys.argv)
