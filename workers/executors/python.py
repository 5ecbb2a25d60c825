"""Python programs: the task's code runs as `__main__` on the sandbox's interpreter
(`-I -S`: the standard library only), with `data` as a global and as JSON on stdin."""

from __future__ import annotations

import asyncio

import orjson

from workers.executors.base import RunOutcome, RunRequest
from workers.executors.outcome import outcome, sandbox_failure, source_of
from workers.sandbox import PythonSource, Sandbox, SandboxError, loop_deadline


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
        if kind == "compile_error":
            return outcome(
                ended, limits, failure_kind="compile_error", message=message, retryable=False
            )
        return outcome(ended, limits, message=message)

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
