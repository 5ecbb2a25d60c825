"""Python programs: the task's code runs as `__main__` on the sandbox's interpreter
(`-I -S`: the standard library only), with `data` as a global and as JSON on stdin."""

from __future__ import annotations

import asyncio
import errno

import orjson

from workers.executors.base import RunOutcome, RunRequest
from workers.executors.outcome import limit_failure, outcome, sandbox_failure, source_of
from workers.sandbox import LimitKind, PythonSource, Sandbox, SandboxError, loop_deadline


class PythonExecutor:
    language = "python"
    needs_slot = True

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox

    async def run(self, request: RunRequest, cancelled: asyncio.Event) -> RunOutcome:
        limits = self.sandbox.limits
        source = source_of(request.code, limits)
        if isinstance(source, RunOutcome):
            return source
        stdin = orjson.dumps(request.data)
        try:
            await self.sandbox.start()
            async with self.sandbox.workspace(request.slot) as workspace:
                ended = await self.sandbox.run(
                    workspace,
                    PythonSource(source),
                    stdin=stdin,
                    deadline=loop_deadline(request.deadline),
                    cancelled=cancelled,
                )
        except SandboxError as error:
            return sandbox_failure(error)
        kind, message = _reported(ended.report)
        limit = _limit_of_exception(message) if kind == "exception" else None
        if limit is not None and ended.how == "exited":
            return limit_failure(ended, limits, limit)
        if kind == "compile_error":
            return outcome(
                ended, limits, failure_kind="compile_error", message=message, retryable=False
            )
        return outcome(ended, limits, message=message)

    async def start(self) -> None:
        """Start the sandbox now (it logs its layers) rather than on the first task."""
        await self.sandbox.start()

    async def close(self) -> None:
        """Stop the sandbox (shared with the other executors: close them together)."""
        await self.sandbox.close()


def _reported(report: bytes) -> tuple[str | None, str | None]:
    """The bootstrap's report: ("exception" | "compile_error", last traceback line)."""
    lines = report.strip().splitlines()
    if not lines:
        return None, None
    try:
        entry = orjson.loads(lines[-1])
        return str(entry["kind"]), str(entry["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None, None


def _limit_of_exception(message: str | None) -> LimitKind | None:
    """The limit an uncaught exception stands for: MemoryError (one allocation beyond the
    memory limit), ENOSPC or EFBIG (a full filesystem, a file at the size limit)."""
    if message is None:
        return None
    if message.startswith("MemoryError"):
        return "memory_limit"
    if any(f"[Errno {number}]" in message for number in (errno.ENOSPC, errno.EFBIG)):
        return "disk_full"
    return None
