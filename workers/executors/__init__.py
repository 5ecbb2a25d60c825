"""Executors by language (python, csharp, echo) and the sandbox they run programs in."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from workers.executors.base import Executor, RunOutcome, RunRequest

if TYPE_CHECKING:
    from workers.sandbox import Limits, Sandbox

__all__ = ["Executor", "RunOutcome", "RunRequest", "build_executors", "executors"]


def executors(sandbox: Sandbox, cache_dir: Path) -> dict[str, Executor]:
    """One executor per language, keyed by the language's name, all running programs in
    `sandbox` (best started with `await sandbox.start()` before the first task, so that
    what it found is logged at once; else it starts on first use). `cache_dir` holds
    compiled C# assemblies. Closing the python or csharp executor closes the sandbox."""
    # Imported here: the sandbox imports this package's zygote client.
    from workers.executors.csharp import CSharpExecutor
    from workers.executors.echo import EchoExecutor
    from workers.executors.python import PythonExecutor

    found: list[Executor] = [
        EchoExecutor(),
        PythonExecutor(sandbox),
        CSharpExecutor(sandbox, cache_dir),
    ]
    return {executor.language: executor for executor in found}


def build_executors(
    concurrency: int, data_dir: Path, limits: Limits | None = None
) -> dict[str, Executor]:
    """The executors of a worker running `concurrency` programs at once: a sandbox with
    one slot per program, C# assemblies cached in `data_dir/csharp-cache`."""
    from workers.sandbox import Sandbox

    return executors(Sandbox(concurrency, limits), data_dir / "csharp-cache")
