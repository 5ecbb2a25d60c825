"""The sandbox's and executors' pure parts: output capture, exit descriptions, reports."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from workers.executors.base import RunRequest
from workers.executors.csharp import _unhandled_exception
from workers.executors.echo import EchoExecutor
from workers.executors.outcome import exit_description, outcome
from workers.executors.python import _reported
from workers.sandbox import Ended, Limits, Sandbox
from workers.sandbox.capture import OutputCapture
from workers.sandbox.child.bootstrap import parse_json
from workers.sandbox.sandbox import _memfd

LIMITS = Limits()


def ended(returncode: int | None, how: str = "exited", stderr: bytes = b"") -> Ended:
    return Ended(how, returncode, b"out", stderr, False, b"", 1.5)  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_capture_keeps_the_cap_and_drains_the_rest() -> None:
    read_end, write_end = os.pipe()
    capture = await OutputCapture.attach(read_end, 10)

    def write_and_close() -> None:  # more than a pipe's buffer: the reader must keep up
        for chunk in (b"abcdef", b"ghijkl", b"x" * 1_000_000):
            view = memoryview(chunk)
            while view:
                view = view[os.write(write_end, view) :]
        os.close(write_end)

    writer = asyncio.get_running_loop().run_in_executor(None, write_and_close)
    await OutputCapture.drain(capture)
    await writer
    assert capture.data() == b"abcdefghij"
    assert capture.truncated


@pytest.mark.asyncio
async def test_capture_under_the_cap_is_whole() -> None:
    read_end, write_end = os.pipe()
    capture = await OutputCapture.attach(read_end, 10)
    os.write(write_end, b"0123456789")
    os.close(write_end)
    await OutputCapture.drain(capture)
    assert capture.data() == b"0123456789"
    assert not capture.truncated


def test_memfd_reads_from_the_start() -> None:
    fd = _memfd("t", b'{"a": 1}')
    try:
        assert os.read(fd, 100) == b'{"a": 1}'
    finally:
        os.close(fd)


def test_parse_json_without_the_json_module_matches_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "json")  # as in a spawned interpreter
    for text in ('{"a": [1, 2.5, "\\u00e9", null, true, false]}', "  3 ", '"x"', "[NaN]"):
        parsed = parse_json(text)
        assert repr(parsed) == repr(json.loads(text))
    for bad in ("", "{", "1 2", "[1,]"):
        with pytest.raises(ValueError, match=r"JSON|Expecting|extra"):
            parse_json(bad)


def test_exit_descriptions() -> None:
    assert exit_description(3, LIMITS) == "exit status 3"
    assert exit_description(-signal.SIGKILL, LIMITS) == "killed by SIGKILL"
    assert exit_description(-signal.SIGXCPU, LIMITS).startswith("killed by SIGXCPU (CPU time")
    assert exit_description(-signal.SIGSEGV, LIMITS) == "killed by SIGSEGV"


def test_outcomes() -> None:
    done = outcome(ended(0), LIMITS)
    assert done.kind == "completed"
    assert done.result is not None
    assert (done.result.stdout, done.result.duration_ms) == ("out", 1.5)
    failed = outcome(ended(2, stderr=b"bad \xff"), LIMITS)
    assert failed.kind == "failed"
    assert failed.retryable
    assert failed.error is not None
    assert (failed.error.message, failed.error.stderr) == ("exit status 2", "bad \ufffd")
    assert outcome(ended(None, "expired"), LIMITS).kind == "expired"
    assert outcome(ended(None, "cancelled"), LIMITS).kind == "cancelled"


def test_python_report_parsing() -> None:
    assert _reported(b"") == (None, None)
    assert _reported(b'{"kind": "exception", "message": "ValueError: x"}\n') == (
        "exception",
        "ValueError: x",
    )
    assert _reported(b"garbage\n") == (None, None)


def test_mono_unhandled_exception_line() -> None:
    stderr = b"\nUnhandled Exception:\nSystem.Exception: boom\n  at P.Main () [0x0]\n"
    assert _unhandled_exception(ended(1, stderr=stderr)) == "System.Exception: boom"
    assert _unhandled_exception(ended(1, stderr=b"other\n")) is None


@pytest.mark.asyncio
async def test_echo_returns_the_data() -> None:
    echo = EchoExecutor()
    deadline = datetime.now(UTC) + timedelta(seconds=5)
    req = RunRequest(uuid.uuid4(), 1, "", {"k": [1, "two"]}, deadline, 0)
    done = await echo.run(req, asyncio.Event())
    assert done.kind == "completed"
    assert done.result is not None
    assert done.result.stdout == '{"k":[1,"two"]}'
    cancelled = asyncio.Event()
    cancelled.set()
    assert (await echo.run(req, cancelled)).kind == "cancelled"
    late = RunRequest(uuid.uuid4(), 1, "", None, datetime.now(UTC) - timedelta(seconds=1), 0)
    assert (await echo.run(late, asyncio.Event())).kind == "expired"


def test_sandbox_needs_a_slot_and_a_start() -> None:
    with pytest.raises(ValueError, match="at least one slot"):
        Sandbox(0)
    with pytest.raises(RuntimeError, match="start"):
        _ = Sandbox(1).capabilities
