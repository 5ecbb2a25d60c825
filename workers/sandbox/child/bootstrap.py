"""The Python bootstrap: what runs a task's Python program in the sandbox.

Standard library only: it runs on the sandbox's interpreter with `-I -S`, which sees
neither the project nor its virtualenv. Two ways in:

- the zygote (`zygote.py`) imports it and calls `run_python(3, 4)` in each forked child;
- a spawned program (the unisolated sandbox) gets this file's source in a memfd and runs
  `python -I -S -c LOADER SOURCE_FD CODE_FD REPORT_FD` (`LOADER` below: the command line
  stays short, and the slot user needs no access to the project's files).

`run_python` sees:

- fd 0: a memfd holding the task's data as JSON (the program may read it as stdin; the
  bootstrap reads it with pread, so the program still sees it from the start);
- CODE_FD: a memfd holding the program's source (UTF-8), closed once read;
- REPORT_FD: a pipe to the worker: one JSON line when the program did not compile
  (`compile_error`) or raised an uncaught exception (`exception`), with the last line of
  the traceback as `message`. It is not inherited by the program's children.
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


def main(argv: list[str]) -> int:
    """The spawned program's entry: `CODE_FD REPORT_FD`."""
    try:
        return run_python(int(argv[1]), int(argv[2]))
    except SystemExit as error:
        return _exit_status(error)


def _exit_status(error: SystemExit) -> int:
    """The exit status the interpreter gives an uncaught SystemExit."""
    if error.code is None:
        return 0
    if isinstance(error.code, int):
        return error.code
    print(error.code, file=sys.stderr)
    return 1


# What a spawned program's `python -I -S -c` runs, with arguments SOURCE_FD CODE_FD
# REPORT_FD: this file's source is in SOURCE_FD; it defines everything above in
# `__main__`, then calls main.
LOADER = (
    "import os,sys;f=int(sys.argv[1]);"
    "exec(compile(os.pread(f,1<<20,0),'taskledger-bootstrap','exec'));"
    "os.close(f);raise SystemExit(main(sys.argv[1:]))"
)
