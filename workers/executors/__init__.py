"""Executors by language (python, csharp, echo); the sandbox they run programs in is
`workers.sandbox`."""

from __future__ import annotations

from pathlib import Path

from workers.executors.base import Executor, RunOutcome, RunRequest
from workers.executors.csharp import CSharpExecutor
from workers.executors.echo import EchoExecutor
from workers.executors.python import PythonExecutor
from workers.sandbox import Limits, Sandbox

__all__ = ["Executor", "RunOutcome", "RunRequest", "build_executors", "executors"]


def executors(sandbox: Sandbox, cache_dir: Path) -> dict[str, Executor]:
    """One executor per language, keyed by the language's name, all running programs in
    `sandbox` (best started with `start()` before the first task, so that what it found is
    logged at once; else it starts on first use). `cache_dir` holds compiled C#
    assemblies. Closing the python or csharp executor closes the sandbox."""
    found: list[Executor] = [
        EchoExecutor(),
        PythonExecutor(sandbox),
        CSharpExecutor(sandbox, cache_dir),
    ]
    return {executor.language: executor for executor in found}


def build_executors(
    concurrency: int,
    data_dir: Path,
    limits: Limits | None = None,
    *,
    allow_unisolated: bool = False,
) -> dict[str, Executor]:
    """The executors of a worker running `concurrency` programs at once: a sandbox with
    one slot per program, C# assemblies cached in `data_dir/csharp-cache`. Without every
    isolation layer, python and csharp tasks are refused unless `allow_unisolated`."""
    sandbox = Sandbox(concurrency, limits, allow_unisolated=allow_unisolated)
    return executors(sandbox, data_dir / "csharp-cache")
