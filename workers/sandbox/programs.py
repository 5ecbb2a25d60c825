"""What a sandbox runs (a `Program`), where (a `Workspace`), and how it ended (`Ended`)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from workers.sandbox.limits import LimitKind


@dataclass(frozen=True)
class Argv:
    """Run an executable (found on the sandbox's clean PATH)."""

    argv: Sequence[str]


@dataclass(frozen=True)
class PythonSource:
    """Run Python source on the sandbox's interpreter through the bootstrap."""

    source: bytes


Program = Argv | PythonSource  # what a sandbox runs


@dataclass
class Ended:
    """How one sandboxed process ended. `returncode` is negative for a signal (as in
    subprocess) and None when it was killed for the deadline or a cancel. `limit` names
    the limit the run hit when it failed at one."""

    how: Literal["exited", "expired", "cancelled"]
    returncode: int | None
    stdout: bytes
    stderr: bytes
    truncated: bool
    report: bytes  # the Python bootstrap's report line(s), empty otherwise
    duration_ms: float
    limit: LimitKind | None = None


@dataclass
class Workspace:
    """A run's private directory (owned by the slot user, removed afterwards). `path` is
    where the worker finds it; the program sees it as `inside`."""

    slot: int
    path: Path
    inside: str
    env: dict[str, str] = field(default_factory=dict)
    clean: bool = True  # no process of the slot can be left (none ran, or it was killed)


def loop_deadline(deadline: datetime) -> float:
    """The event loop's clock reading at which `deadline` (aware UTC) passes."""
    remaining = (deadline - datetime.now(UTC)).total_seconds()
    return asyncio.get_running_loop().time() + remaining


def memfd(name: str, content: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    view = memoryview(content)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
