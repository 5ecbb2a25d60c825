"""What one run may use, and which limit ended a run."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Literal

MiB = 1024 * 1024

# How a run was stopped by one of its limits; the attempt's error kind.
LimitKind = Literal["memory_limit", "pids", "disk_full", "cpu"]


@dataclass(frozen=True)
class Limits:
    """Per-run limits. With cgroups (the isolated sandbox), `memory_bytes`, `processes`
    and `cpus` bound all of a run's processes together; without them, memory and file
    size are per process and `processes` counts the slot user's processes."""

    memory_bytes: int = 512 * MiB  # RAM and tmpfs pages of the run together
    processes: int = 256  # processes and threads at once (Mono starts a dozen threads)
    cpus: float = 1.0  # CPU time per wall-clock second (a cgroup quota)
    tmp_bytes: int = 64 * MiB  # each of /tmp, /var/tmp, /dev/shm and the run's directory
    tmp_files: int = 16_384  # files and directories in each of them
    # A backstop only: the deadline (at most the longest ttl) kills first. A lower cap would
    # kill legitimate long computations that still fit their ttl.
    cpu_seconds: int = 86_400
    open_files: int = 64
    output_bytes: int = 1 * MiB  # each of stdout and stderr
    code_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        for name in ("memory_bytes", "processes", "tmp_bytes", "tmp_files", "cpu_seconds"):
            if getattr(self, name) < 1:
                raise ValueError(f"sandbox limit {name} must be positive")
        if not 0.01 <= self.cpus <= 1024:
            raise ValueError("sandbox limit cpus must be between 0.01 and 1024")

    @property
    def file_size_bytes(self) -> int:
        """The largest file a process may write (RLIMIT_FSIZE): what fits in a tmpfs."""
        return self.tmp_bytes

    def rlimits(self, *, per_user: bool) -> dict[str, tuple[int, int]]:
        """The per-process limits as setrlimit pairs (soft, hard)."""
        pairs = {
            # SIGXCPU at the soft limit says why; SIGKILL a second later if ignored.
            "RLIMIT_CPU": (self.cpu_seconds, self.cpu_seconds + 1),
            # One process cannot ask for more than the whole run may use: a Python program
            # gets MemoryError (with its traceback) rather than the cgroup's OOM kill.
            "RLIMIT_AS": (self.memory_bytes, self.memory_bytes),
            "RLIMIT_FSIZE": (self.file_size_bytes, self.file_size_bytes),
            "RLIMIT_NOFILE": (self.open_files, self.open_files),
            "RLIMIT_CORE": (0, 0),
        }
        if per_user:  # RLIMIT_NPROC counts the real user's processes (root ignores it)
            pairs["RLIMIT_NPROC"] = (self.processes, self.processes)
        return pairs

    def describe(self, kind: LimitKind) -> str:
        """What the limit is, for the attempt's error message and the operator."""
        if kind == "memory_limit":
            return (
                f"the run needed more than its {self.memory_bytes // MiB} MiB of memory "
                "(RAM and files in its tmpfs together; [sandbox] memory_mib)"
            )
        if kind == "pids":
            return (
                f"the run tried to have more than {self.processes} processes and threads "
                "at once ([sandbox] pids)"
            )
        if kind == "disk_full":
            return (
                f"the run filled a {self.tmp_bytes // MiB} MiB ({self.tmp_files} files) "
                "filesystem: /tmp, /var/tmp, /dev/shm and its working directory are each "
                "that size ([sandbox] tmp_mib)"
            )
        return f"the run used its {self.cpu_seconds} s of CPU time"


def signal_limit(returncode: int | None) -> LimitKind | None:
    """The limit a fatal signal stands for: SIGXCPU (RLIMIT_CPU), SIGXFSZ (RLIMIT_FSIZE)."""
    if returncode == -signal.SIGXCPU:
        return "cpu"
    if returncode == -signal.SIGXFSZ:
        return "disk_full"
    return None
