"""The sandbox's slot users: one unprivileged system user per slot, claimed by one
worker at a time, and how to find and kill every process of one."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import grp
import logging
import os
import pwd
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from workers.sandbox.errors import SandboxError

log = logging.getLogger(__name__)

USER_PREFIX = "tlsbx"
MAX_USERS = 256
# A slot user the sandbox creates, tlsbx<n>, gets uid and gid UID_BASE + n, as the image
# makes them (Dockerfile, SANDBOX_UID_BASE). Not a system uid (`useradd --system` gave 999
# and down, the uid the official postgres and rabbitmq images run as), and above
# login.defs' UID_MAX (60000 on Debian): useradd gives a new user the highest uid in
# UID_MIN..UID_MAX plus one, so slot users inside that range had the next user (the
# embedded PostgreSQL's `pgserver`) take the next slot's id. Below SUB_UID_MIN (100000),
# where subordinate ids for user namespaces start.
UID_BASE = 70_000
CLEAN_PATH = "/usr/local/bin:/usr/bin:/bin"
KILL_WAIT_SECONDS = 10.0  # SIGKILLed processes are gone well before this
ZOMBIE_WAIT_SECONDS = 3.0  # for pid 1 to bury orphans (see wait_for_no_processes)


@dataclass(frozen=True)
class SlotUser:
    name: str
    uid: int
    gid: int


async def claim_users(count: int, lock_dir: Path) -> tuple[list[SlotUser], list[IO[bytes]]]:
    """`count` users (created if missing), each held by an flock (the open files returned:
    close them to let go) so that two workers on one machine never share a user: killing
    by uid would kill the other's programs."""
    lock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    users: list[SlotUser] = []
    locks: list[IO[bytes]] = []
    for n in range(MAX_USERS):
        if len(users) == count:
            return users, locks
        name = f"{USER_PREFIX}{n}"
        lock = (lock_dir / f"{name}.lock").open("wb")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        locks.append(lock)
        try:
            users.append(await ensure_user(name, UID_BASE + n))
        except BaseException:
            for held in locks:  # the users claimed so far go back, as on any failure
                held.close()
            raise
    for held in locks:
        held.close()
    raise SandboxError(f"no free sandbox user among {USER_PREFIX}0..{MAX_USERS - 1}")


async def ensure_user(name: str, uid: int) -> SlotUser:
    """The slot user `name`, created with uid and gid `uid` (its own group) if missing. A
    uid or gid already taken is refused (useradd without --non-unique): programs must
    never run as someone else."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        code, output = await run_quietly(["groupadd", "--gid", str(uid), name])
        if code != 0 and _gid_of(name) == uid:
            code = 0  # left by an earlier try whose useradd failed
        if code == 0:
            code, output = await run_quietly(
                [
                    "useradd",
                    "--uid",
                    str(uid),
                    "--gid",
                    str(uid),
                    "--no-create-home",
                    "--home-dir",
                    "/nonexistent",
                    "--shell",
                    "/usr/sbin/nologin",
                    "--comment",
                    "taskledger sandbox slot",
                    name,
                ]
            )
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise SandboxError(
                f"could not create the sandbox user {name} with uid and gid {uid}: {output}. "
                f"Free that id, or create {name} yourself (a user of its own, no login)"
            ) from None
        if code == 0:
            log.info("sandbox: created the user %s (uid %d)", name, uid, extra={"slot_user": name})
    if entry.pw_uid == 0:
        raise SandboxError(f"sandbox user {name} has uid 0")
    return SlotUser(name=name, uid=entry.pw_uid, gid=entry.pw_gid)


def _gid_of(group: str) -> int | None:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        return None


async def wait_for_no_processes(user: SlotUser, *, zombies: bool = False) -> None:
    """Wait until /proc shows no live process of the user, killing again whatever lives
    (SIGKILL is delivered, not yet acted on, when kill() returns); with `zombies`, until
    it shows no unburied dead either.

    The dead count against RLIMIT_NPROC until their parent buries them, and orphans of a
    spawned program go to pid 1, which may bury them late (here: within a second), or
    never, in a container without an init. So zombies are waited for only for a while,
    and only before the slot's next run (not at the end of this one: it is over)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while True:
        alive = uid_processes(user.uid)
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not alive and not (zombies and uid_processes(user.uid, zombies=True)):
            return
        waited = loop.time() - started
        if waited > (KILL_WAIT_SECONDS if alive else ZOMBIE_WAIT_SECONDS):
            break
        await asyncio.sleep(0.002)
    log.warning(
        "sandbox: %s of %s are still there after %.1f s%s",
        "processes" if alive else "zombies",
        user.name,
        waited,
        ""
        if alive
        else " (pid 1 does not bury orphans: they count against the slot's "
        "process limit until it does)",
        extra={"slot_user": user.name, "pids": uid_processes(user.uid, zombies=True)},
    )


def uid_processes(uid: int, *, zombies: bool = False) -> list[int]:
    """Processes whose real uid is `uid`, read from /proc: the live ones, or (`zombies`)
    the dead that no parent has buried yet as well."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status", "rb") as status:
                text = status.read()
        except OSError:
            continue
        state = uid_field = None
        for line in text.splitlines():
            if line.startswith(b"State:"):
                state = line.split()[1]
            elif line.startswith(b"Uid:"):
                uid_field = int(line.split()[1])
                break
        if uid_field == uid and (zombies or state not in (b"Z", b"X")):
            found.append(int(entry.name))
    return found


async def run_quietly(argv: list[str]) -> tuple[int, str]:
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={"PATH": CLEAN_PATH + ":/usr/sbin:/sbin", "LANG": "C.UTF-8"},
        )
    except OSError as error:
        return error.errno or errno.ENOENT, str(error)
    output, _ = await process.communicate()
    return process.returncode or 0, output.decode(errors="replace")
