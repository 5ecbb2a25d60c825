"""Executors by language (python, csharp, echo) and the sandbox they run programs in."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from workers.executors.base import Executor, RunOutcome, RunRequest

if TYPE_CHECKING:
    from workers.sandbox import Sandbox

__all__ = ["Executor", "RunOutcome", "RunRequest", "executors"]


def executors(sandbox: Sandbox, cache_dir: Path) -> dict[str, Executor]:
    """One executor per language, keyed by the language's name. `sandbox` must have been
    started; `cache_dir` holds compiled C# assemblies (e.g. `<data dir>/csharp-cache`)."""
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
