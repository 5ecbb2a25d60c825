"""The unisolated way to start a program: spawned through util-linux exec wrappers.

Used where the isolated sandbox cannot run (not root, or no namespaces), and only when
the operator opted in (`[sandbox] allow_unisolated`) or asked for it (`Sandbox(isolate=
False)`): the program gets its own network namespace where the kernel allows one, the
slot user as root, rlimits, a clean environment and a fresh directory, and no more.

`unshare --net` (as root, before dropping privileges) → `setpriv --reuid --regid
--clear-groups --no-new-privs` → `prlimit` → the program. Never `preexec_fn`: the worker's
event loop shares its process with threads, and subprocess's own options are thread-safe.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from workers.sandbox.child.bootstrap import LOADER
from workers.sandbox.errors import SandboxError
from workers.sandbox.limits import Limits
from workers.sandbox.users import CLEAN_PATH, SlotUser, run_quietly

BOOTSTRAP = (Path(__file__).parent / "child" / "bootstrap.py").read_bytes()
RLIMIT_OPTIONS = {
    "RLIMIT_CPU": "--cpu",
    "RLIMIT_AS": "--as",
    "RLIMIT_FSIZE": "--fsize",
    "RLIMIT_NOFILE": "--nofile",
    "RLIMIT_CORE": "--core",
    "RLIMIT_NPROC": "--nproc",
}


class Spawner:
    def __init__(self) -> None:
        self.tools: dict[str, str] = {}
        self.root = os.geteuid() == 0
        self.network = False  # a new network namespace per run works here

    async def start(self) -> str:
        """Find the wrappers and probe the network namespace; "" or why it is missing."""
        for tool in ("unshare", "setpriv", "prlimit"):
            found = shutil.which(tool, path=CLEAN_PATH + ":/usr/sbin:/sbin")
            if found is None:
                raise SandboxError(f"`{tool}` is missing: install util-linux")
            self.tools[tool] = found
        self.tools["kill"] = shutil.which("kill", path=CLEAN_PATH) or ""
        argv = [self.tools["unshare"], "--net", "--", "true"]
        if not self.root:
            argv[1:1] = ["--user", "--map-current-user"]
        code, output = await run_quietly(argv)
        self.network = code == 0
        if self.network:
            return ""
        return f"`{' '.join(argv[:-2])}` failed here ({output.strip() or code})"

    def wrap(self, argv: Sequence[str], limits: Limits, user: SlotUser | None) -> list[str]:
        """The exec wrappers that put `argv` in the unisolated sandbox."""
        wrapped: list[str] = []
        if self.network:
            wrapped += [self.tools["unshare"], "--net"]
            if not self.root:
                wrapped += ["--user", "--map-current-user"]
            wrapped.append("--")
        if user is not None:
            wrapped += [
                self.tools["setpriv"],
                f"--reuid={user.uid}",
                f"--regid={user.gid}",
                "--clear-groups",
                "--no-new-privs",
                "--",
            ]
        wrapped.append(self.tools["prlimit"])
        for name, (soft, hard) in limits.rlimits(per_user=user is not None).items():
            wrapped.append(f"{RLIMIT_OPTIONS[name]}={soft}:{hard}")
        return [*wrapped, "--", *argv]

    async def spawn(
        self,
        argv: Sequence[str],
        child_fds: Sequence[int],
        *,
        env: Mapping[str, str],
        cwd: Path,
        limits: Limits,
        user: SlotUser | None,
    ) -> asyncio.subprocess.Process:
        """Start `argv` with child_fds[0:3] as its stdin, stdout and stderr and the rest
        passed on under their own numbers."""
        return await asyncio.create_subprocess_exec(
            *self.wrap(argv, limits, user),
            stdin=child_fds[0],
            stdout=child_fds[1],
            stderr=child_fds[2],
            pass_fds=child_fds[3:],
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )

    @staticmethod
    def python_argv(python: str, source_fd: int, code_fd: int, report_fd: int) -> list[str]:
        """A spawned Python program: the bootstrap's source in `source_fd` (a memfd)."""
        return [python, "-I", "-S", "-c", LOADER, str(source_fd), str(code_fd), str(report_fd)]

    async def kill_uid(self, user: SlotUser, python: str) -> None:
        """kill(-1, SIGKILL) as `user`: every process of the user, in one step under the
        kernel's task-list lock (a fork bomb cannot outrun it). setpriv rather than
        subprocess's user=, which cannot use vfork. (Its exit status says nothing: kill(-1)
        succeeds if any process exists.)"""
        setuid = [
            self.tools["setpriv"],
            f"--reuid={user.uid}",
            f"--regid={user.gid}",
            "--clear-groups",
            "--",
        ]
        if self.tools.get("kill"):
            argv = [*setuid, self.tools["kill"], "-9", "-1"]
        else:
            argv = [
                *setuid,
                python or sys.executable,
                "-I",
                "-S",
                "-c",
                "import os; os.kill(-1, 9)",
            ]
        killer = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env={"PATH": CLEAN_PATH},
            cwd="/",
        )
        await killer.wait()
