"""Slot users the sandbox creates get an explicit high uid and a group of their own (the
image's numbering), never a system uid (`useradd --system` gave 999, the uid of the
official postgres and rabbitmq images), and never an id someone else has."""

from __future__ import annotations

import os
import pwd
import secrets
import subprocess
from collections.abc import Iterator

import pytest

from tests import services
from workers.sandbox.errors import SandboxError
from workers.sandbox.users import MAX_USERS, UID_BASE, ensure_user


@pytest.fixture
def name() -> Iterator[str]:
    if os.geteuid() != 0:
        services.unavailable("root", "creating users needs root")
    made = f"tltest{secrets.token_hex(3)}"
    yield made
    subprocess.run(["userdel", made], capture_output=True, check=False)
    subprocess.run(["groupdel", made], capture_output=True, check=False)


def free_id() -> int:
    while True:
        uid = 29_000 + secrets.randbelow(900)
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid


@pytest.mark.asyncio
async def test_a_created_slot_user_has_the_uid_asked_and_a_group_of_its_own(name: str) -> None:
    uid = free_id()
    user = await ensure_user(name, uid)
    assert (user.uid, user.gid) == (uid, uid)
    entry = pwd.getpwnam(name)
    assert (entry.pw_uid, entry.pw_gid, entry.pw_shell) == (uid, uid, "/usr/sbin/nologin")
    assert await ensure_user(name, uid + 1) == user  # an existing user is taken as it is


@pytest.mark.asyncio
async def test_an_id_someone_else_has_is_refused(name: str) -> None:
    taken = pwd.getpwnam("nobody").pw_uid
    with pytest.raises(SandboxError, match=f"uid and gid {taken}"):
        await ensure_user(name, taken)
    with pytest.raises(KeyError):
        pwd.getpwnam(name)


@pytest.mark.asyncio
async def test_a_user_useradd_makes_later_never_takes_a_slot_users_id(name: str) -> None:
    """useradd gives a new user the highest uid in UID_MIN..UID_MAX plus one: with slot
    users inside that range, the next ordinary user (the embedded PostgreSQL's
    `pgserver`, an operator's account) took the uid of the next slot, and that slot's
    user could never be made (`groupadd: GID '20002' already exists`)."""
    ordinary = f"{name}u"
    await ensure_user(name, UID_BASE + MAX_USERS - 2)
    try:
        subprocess.run(
            ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", ordinary],
            check=True,
            capture_output=True,
        )
        uid = pwd.getpwnam(ordinary).pw_uid
        assert not UID_BASE <= uid < UID_BASE + MAX_USERS, uid
    finally:
        subprocess.run(["userdel", ordinary], capture_output=True, check=False)
        subprocess.run(["groupdel", ordinary], capture_output=True, check=False)
