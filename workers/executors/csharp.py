"""C# programs on Mono: `mcs` compiles in the sandbox, `mono` runs the assembly there.

Assemblies are cached by the SHA-256 of the source in `cache_dir`, so the same program
compiles once per worker machine. The cache belongs to the worker's user (mode 0700):
each run gets a copy of its assembly in its own directory, so no sandboxed program can
read another task's assembly, and the cache may live anywhere (under /root, say).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
import shutil
import stat
import tempfile
from dataclasses import replace
from pathlib import Path

import orjson

from ledger import AttemptError
from workers.executors.base import RunOutcome, RunRequest
from workers.executors.outcome import (
    exit_description,
    outcome,
    sandbox_failure,
    source_of,
    text,
)
from workers.sandbox import (
    CLEAN_PATH,
    Argv,
    Ended,
    Sandbox,
    SandboxError,
    Workspace,
    loop_deadline,
)

log = logging.getLogger(__name__)

SOURCE_NAME = "Program.cs"
COMPILED_NAME = "compiled.exe"  # what mcs writes in the workspace
ASSEMBLY_NAME = "program.exe"  # the cached copy mono runs
UNAVAILABLE = (
    "C# needs Mono on the worker: install the Debian packages mono-mcs and mono-runtime "
    "(apt-get install mono-mcs mono-runtime)"
)


class CSharpExecutor:
    language = "csharp"
    needs_slot = True

    def __init__(
        self,
        sandbox: Sandbox,
        cache_dir: Path,
        *,
        mcs: str | None = None,
        mono: str | None = None,
        compile_seconds: float = 30.0,
    ) -> None:
        self.sandbox = sandbox
        self.cache_dir = cache_dir
        self.mcs = mcs if mcs is not None else shutil.which("mcs", path=CLEAN_PATH)
        self.mono = mono if mono is not None else shutil.which("mono", path=CLEAN_PATH)
        self.compile_seconds = compile_seconds
        self.compilations = 0  # how many times mcs ran (the cache's hits are the rest)
        self.available = all(tool and os.access(tool, os.X_OK) for tool in (self.mcs, self.mono))
        if self.available:
            cache_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(cache_dir, 0o700)
            log.info(
                "csharp: mcs %s, mono %s, assemblies cached in %s",
                self.mcs,
                self.mono,
                cache_dir,
                extra={"mcs": self.mcs, "mono": self.mono, "cache_dir": str(cache_dir)},
            )
        else:
            log.warning(
                "csharp: every C# task will fail: %s",
                UNAVAILABLE,
                extra={"mcs": self.mcs, "mono": self.mono},
            )

    async def run(self, request: RunRequest, cancelled: asyncio.Event) -> RunOutcome:
        if not self.available:
            error = AttemptError("language_unavailable", UNAVAILABLE)
            return RunOutcome("failed", error=error, retryable=False)
        source = source_of(request.code, self.sandbox.limits)
        if isinstance(source, RunOutcome):
            return source
        assembly = self.cache_dir / f"{hashlib.sha256(source).hexdigest()}.exe"
        try:
            await self.sandbox.start()
            return await self._compile_and_run(request, source, assembly, cancelled)
        except SandboxError as error:
            return sandbox_failure(error)

    async def _compile_and_run(
        self, request: RunRequest, source: bytes, assembly: Path, cancelled: asyncio.Event
    ) -> RunOutcome:
        deadline = loop_deadline(request.deadline)
        async with self.sandbox.workspace(request.slot) as workspace:
            if not assembly.exists():
                failed = await self._compile(workspace, source, assembly, deadline, cancelled)
                if failed is not None:
                    return failed
            assert self.mono is not None
            _copy(assembly, workspace.path / ASSEMBLY_NAME)
            ended = await self.sandbox.run(
                workspace,
                Argv([self.mono, ASSEMBLY_NAME]),
                stdin=orjson.dumps(request.data),
                deadline=deadline,
                cancelled=cancelled,
            )
        return outcome(ended, self.sandbox.limits, message=_unhandled_exception(ended))

    async def _compile(
        self,
        workspace: Workspace,
        source: bytes,
        assembly: Path,
        deadline: float,
        cancelled: asyncio.Event,
    ) -> RunOutcome | None:
        """Compile into the cache; the failed outcome, or None when it compiled."""
        assert self.mcs is not None
        self.compilations += 1
        (workspace.path / SOURCE_NAME).write_bytes(source)
        loop = asyncio.get_running_loop()
        compile_deadline = min(deadline, loop.time() + self.compile_seconds)
        # mcs gets the compile time as its CPU limit; the program keeps the normal one.
        compile_limits = replace(self.sandbox.limits, cpu_seconds=max(1, int(self.compile_seconds)))
        ended = await self.sandbox.run(
            workspace,
            Argv([self.mcs, f"-out:{COMPILED_NAME}", SOURCE_NAME]),
            stdin=b"",
            deadline=compile_deadline,
            cancelled=cancelled,
            limits=compile_limits,
        )
        if ended.how == "cancelled" or (ended.how == "expired" and loop.time() >= deadline):
            return RunOutcome(ended.how)
        if ended.how == "expired":
            message = f"compilation took longer than {self.compile_seconds:g} s"
            error = AttemptError("compile_error", message, stderr=text(ended.stderr))
            return RunOutcome("failed", error=error, retryable=False)
        assert ended.returncode is not None
        if ended.returncode < 0:  # the compiler crashed or hit a limit: not the code's fault
            message = f"mcs was {exit_description(ended.returncode, compile_limits)}"
            # Mono writes its own assertion to stdout, its crash dump to stderr: keep both.
            output = "\n".join(filter(None, (text(ended.stdout), text(ended.stderr))))
            error = AttemptError("sandbox_error", message, stderr=output)
            return RunOutcome("failed", error=error, retryable=True)
        if ended.returncode != 0:
            return _compile_error(ended)
        try:
            _store(workspace.path / COMPILED_NAME, assembly)
        except OSError as problem:
            error = AttemptError("sandbox_error", f"cannot cache the assembly: {problem}")
            return RunOutcome("failed", error=error, retryable=True)
        return None

    async def start(self) -> None:
        """Start the sandbox now (it logs its layers) rather than on the first task."""
        await self.sandbox.start()

    async def close(self) -> None:
        """Stop the sandbox (shared with the other executors: close them together)."""
        await self.sandbox.close()


def _compile_error(ended: Ended) -> RunOutcome:
    output = text(ended.stderr) + text(ended.stdout)
    errors = [line for line in output.splitlines() if ": error " in line]
    message = "\n".join(errors) or output.strip() or f"mcs exit status {ended.returncode}"
    error = AttemptError("compile_error", message, stderr=output, exit_code=ended.returncode)
    return RunOutcome("failed", error=error, retryable=False)


def _store(compiled: Path, assembly: Path) -> None:
    """Copy the assembly into the cache atomically (a reader never sees half a file).

    The workspace belongs to the slot user: refuse a symbolic link or anything but a
    regular file there, so that root never copies a file the program pointed it at."""
    src_fd = os.open(compiled, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(src_fd, "rb") as src:
        if not stat.S_ISREG(os.fstat(src_fd).st_mode):
            raise OSError(f"{compiled} is not a regular file")
        fd, partial = tempfile.mkstemp(dir=assembly.parent, prefix=".partial-")
        try:
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(src, out)
            os.chmod(partial, 0o644)
            os.replace(partial, assembly)
        except BaseException:
            os.unlink(partial)
            raise


def _copy(assembly: Path, destination: Path) -> None:
    """A read-only copy for the run; never through a link the slot user may have made."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with assembly.open("rb") as src, os.fdopen(os.open(destination, flags, 0o644), "wb") as out:
        shutil.copyfileobj(src, out)


def _unhandled_exception(ended: Ended) -> str | None:
    """Mono's "Unhandled Exception:" is followed by `Type: message`."""
    lines = text(ended.stderr).splitlines()
    for before, line in itertools.pairwise(lines):
        if before.strip() == "Unhandled Exception:" and line.strip():
            return line.strip()
    return None
