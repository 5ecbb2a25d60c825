"""Turning how a sandboxed process ended into the attempt's outcome."""

from __future__ import annotations

import signal

from ledger import AttemptError, AttemptResult
from workers.executors.base import RunOutcome
from workers.sandbox import Ended, LimitKind, Limits, SandboxError, SandboxUnavailable


def text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def source_of(code: str, limits: Limits) -> bytes | RunOutcome:
    """The code as UTF-8, or the permanent failure of code that is not valid UTF-8 (lone
    surrogates) or is too large."""
    try:
        source = code.encode("utf-8")
    except UnicodeEncodeError as error:
        return _invalid_code(f"the code is not valid UTF-8 ({error.reason} at {error.start})")
    if len(source) > limits.code_bytes:
        return _invalid_code(f"the code is {len(source)} bytes; at most {limits.code_bytes}")
    return source


def _invalid_code(message: str) -> RunOutcome:
    return RunOutcome("failed", error=AttemptError("invalid_code", message), retryable=False)


def sandbox_failure(error: SandboxError) -> RunOutcome:
    """The sandbox could not run the program. Refused for a missing layer: permanent (this
    worker will not run it); lost (its zygote died): the program may be fine, retry it."""
    if isinstance(error, SandboxUnavailable):
        failure = AttemptError("sandbox_unavailable", str(error))
        return RunOutcome("failed", error=failure, retryable=False)
    return RunOutcome("failed", error=AttemptError("sandbox_error", str(error)), retryable=True)


def limit_failure(ended: Ended, limits: Limits, kind: LimitKind) -> RunOutcome:
    """The run hit one of its limits: permanent, as the same program would hit it again."""
    error = AttemptError(
        kind=kind,
        message=limits.describe(kind),
        stderr=text(ended.stderr),
        exit_code=ended.returncode,
    )
    return RunOutcome("failed", error=error, retryable=False)


def exit_description(returncode: int, limits: Limits) -> str:
    """`exit status N`, or which signal killed it and the likely reason."""
    if returncode >= 0:
        return f"exit status {returncode}"
    number = -returncode
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    if number == signal.SIGKILL:
        return "killed by SIGKILL"
    if number == signal.SIGXCPU:
        return f"killed by SIGXCPU (CPU time limit of {limits.cpu_seconds} s)"
    if number == signal.SIGXFSZ:
        return f"killed by SIGXFSZ (file size limit of {limits.file_size_bytes} bytes)"
    return f"killed by {name}"


def outcome(
    ended: Ended,
    limits: Limits,
    *,
    failure_kind: str = "program_error",
    message: str | None = None,
    retryable: bool = True,
) -> RunOutcome:
    """Completed on exit 0; failed at a limit (permanent); else failed with `message` (or
    the exit description)."""
    if ended.how != "exited":
        return RunOutcome(ended.how)
    assert ended.returncode is not None
    if ended.returncode != 0 and ended.limit is not None:
        return limit_failure(ended, limits, ended.limit)
    if ended.returncode == 0:
        result = AttemptResult(
            stdout=text(ended.stdout),
            stderr=text(ended.stderr),
            exit_code=0,
            duration_ms=round(ended.duration_ms, 3),
            truncated=ended.truncated,
        )
        return RunOutcome("completed", result=result)
    error = AttemptError(
        kind=failure_kind,
        message=message or exit_description(ended.returncode, limits),
        stderr=text(ended.stderr),
        exit_code=ended.returncode,
    )
    return RunOutcome("failed", error=error, retryable=retryable)
