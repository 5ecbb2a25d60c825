"""The sandbox, attacked: each test is a program that tries an escape or a hoard and
reports back what it got, and the test asserts that it got nothing.

Real processes in the real isolated sandbox (root, here and in CI: it fails in CI when
the sandbox cannot isolate, and is skipped elsewhere). The programs use the executors'
public API, so this file also runs against an older sandbox to show what it let through.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from ledger.jsonvalue import JSONValue
from tests import services
from tests.sandboxing import describe, request
from workers.executors.base import RunRequest
from workers.executors.csharp import CSharpExecutor
from workers.executors.python import PythonExecutor
from workers.sandbox import Limits, Sandbox, uid_processes

pytestmark = pytest.mark.asyncio(loop_scope="module")

MiB = 1024 * 1024
LIMITS = Limits(memory_bytes=256 * MiB, tmp_bytes=16 * MiB, tmp_files=2_000, processes=128)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sandbox() -> AsyncIterator[Sandbox]:
    if os.geteuid() != 0:
        services.unavailable("root", "the isolated sandbox needs root (slot users, namespaces)")
    sandbox = Sandbox(2, LIMITS)
    caps = await sandbox.start()
    missing = [layer for layer in getattr(caps, "layers", ()) if not layer.active]
    if missing:
        await sandbox.close()
        services.unavailable(
            "sandbox layers", "; ".join(f"{layer.name}: {layer.detail}" for layer in missing)
        )
    yield sandbox
    await sandbox.close()


async def report(executor: PythonExecutor | CSharpExecutor, req: RunRequest) -> JSONValue:
    """Run an attacker that prints one JSON document; what it printed."""
    outcome = await executor.run(req, asyncio.Event())
    assert outcome.kind == "completed", describe(outcome)
    assert outcome.result is not None
    lines = outcome.result.stdout.strip().splitlines()
    assert lines, describe(outcome)
    reported: JSONValue = json.loads(lines[-1])
    return reported


# -- host sockets -----------------------------------------------------------------------


@pytest.fixture
def host_sockets() -> Iterator[list[str]]:
    """Listening Unix sockets on the host, open to everyone (as a database's often is):
    one under /run, one under /tmp, and the local PostgreSQL's if there is one."""
    paths = [
        f"/run/tl-attack-{secrets.token_hex(4)}.sock",
        f"/tmp/tl-attack-{secrets.token_hex(4)}.sock",
    ]
    listeners = []
    for path in paths:
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(path)
        os.chmod(path, 0o777)  # noqa: S103 - the attacker's best case
        listener.listen(8)
        listeners.append(listener)
    postgres = "/var/run/postgresql/.s.PGSQL.5432"
    yield paths + ([postgres] if os.path.exists(postgres) else [])
    for listener, path in zip(listeners, paths, strict=True):
        listener.close()
        os.unlink(path)


CONNECT_UNIX = """
import json, socket
got = {}
for path in data:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        got[path] = "connected"
    except OSError as e:
        got[path] = f"{type(e).__name__}: {e}"
    finally:
        s.close()
print(json.dumps(got))
"""


async def test_host_unix_sockets_are_out_of_reach(
    python: PythonExecutor, host_sockets: list[str]
) -> None:
    got = await report(python, request(CONNECT_UNIX, host_sockets))
    assert isinstance(got, dict)
    assert set(got) == set(host_sockets)
    assert "connected" not in got.values(), got


CSHARP_CONNECT_UNIX = """
using System;
using System.Net.Sockets;
class P {
    static void Main() {
        var paths = Console.In.ReadToEnd().Trim('[', ']', '\\n').Split(',');
        var got = new System.Collections.Generic.List<string>();
        foreach (var quoted in paths) {
            var path = quoted.Trim().Trim('"');
            var s = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            try {
                s.Connect(new UnixDomainSocketEndPoint(path));
                got.Add("\\"connected\\"");
            } catch (Exception e) {
                got.Add("\\"" + e.GetType().Name + "\\"");
            } finally {
                s.Close();
            }
        }
        Console.WriteLine("[" + string.Join(",", got) + "]");
    }
}
"""


async def test_host_unix_sockets_are_out_of_reach_from_csharp(
    csharp: CSharpExecutor, host_sockets: list[str]
) -> None:
    got = await report(csharp, request(CSHARP_CONNECT_UNIX, host_sockets, seconds=60))
    assert isinstance(got, list)
    assert len(got) == len(host_sockets)
    assert "connected" not in got, got


# -- what a run leaves behind -------------------------------------------------------------

PLACES = ["/tmp", "/var/tmp", "/dev/shm", "/run/lock"]

LEAVE_FILES = """
import json, os
left = {}
for place in data:
    path = os.path.join(place, "tl-left-behind")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, b"secret of the first tenant")
        os.close(fd)
        left[place] = "written"
    except OSError as e:
        left[place] = str(e)
print(json.dumps(left))
"""

FIND_FILES = """
import json, os
found = {}
for place in data:
    path = os.path.join(place, "tl-left-behind")
    try:
        with open(path) as f:
            found[place] = f.read()
    except OSError as e:
        found[place] = None
print(json.dumps(found))
"""


async def test_files_do_not_survive_a_run(python: PythonExecutor) -> None:
    written = await report(python, request(LEAVE_FILES, PLACES, slot=1))
    assert isinstance(written, dict)
    assert written["/tmp"] == "written"  # the program could write; it must not last
    for slot in (1, 0):  # the next task in the same slot, and in the other
        found = await report(python, request(FIND_FILES, PLACES, slot=slot))
        assert found == dict.fromkeys(PLACES), found


async def test_csharp_files_do_not_survive_a_run(csharp: CSharpExecutor) -> None:
    write = (
        "class P { static void Main() { System.IO.File.WriteAllText("
        '"/tmp/tl-left-by-csharp", "secret"); System.Console.WriteLine("[]"); } }'
    )
    read = (
        "class P { static void Main() { System.Console.WriteLine("
        'System.IO.File.Exists("/tmp/tl-left-by-csharp") ? "[true]" : "[false]"); } }'
    )
    assert await report(csharp, request(write, seconds=60)) == []
    assert await report(csharp, request(read, seconds=60)) == [False]


SYSV_SHM = """
import ctypes, json
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
KEY = 0x7a5c
if data == "create":
    shmid = libc.shmget(KEY, 1 << 20, 0o1600)  # IPC_CREAT | 0600
    address = libc.shmat(shmid, None, 0)
    ctypes.memmove(address, b"secret of the first tenant", 26)
    print(json.dumps(shmid >= 0))
else:
    shmid = libc.shmget(KEY, 0, 0)
    print(json.dumps(shmid >= 0))
"""


async def test_sysv_shared_memory_does_not_survive_a_run(python: PythonExecutor) -> None:
    assert await report(python, request(SYSV_SHM, "create")) is True
    assert await report(python, request(SYSV_SHM, "find")) is False


# -- hoarding -------------------------------------------------------------------------------

FILL = """
import json, os
written = {}
for place in data["places"]:
    total = 0
    chunk = b"x" * (1 << 20)
    try:
        for n in range(data["files"]):
            with open(os.path.join(place, f"fill-{n}"), "wb") as f:
                for _ in range(8):
                    f.write(chunk)
                    total += len(chunk)
                    if total >= data["stop"]:
                        raise StopIteration
    except (OSError, StopIteration):
        pass
    written[place] = total
print(json.dumps(written))
"""


async def test_tmp_and_shm_stop_at_their_size(python: PythonExecutor) -> None:
    places = ["/tmp", "/dev/shm", "/var/tmp", "."]
    data = {"places": places, "files": 64, "stop": 4 * LIMITS.tmp_bytes}
    written = await report(python, request(FILL, data))
    assert isinstance(written, dict)
    for place in places:
        assert written[place] <= LIMITS.tmp_bytes, written


async def test_a_full_disk_fails_as_disk_full(python: PythonExecutor) -> None:
    code = "with open('/tmp/big', 'wb') as f:\n    while True:\n        f.write(b'x' * 65536)\n"
    outcome = await python.run(request(code), asyncio.Event())
    assert outcome.kind == "failed", describe(outcome)
    assert outcome.error is not None
    assert outcome.error.kind == "disk_full", describe(outcome)
    assert not outcome.retryable


FORK_UNTIL_REFUSED = """
import os, time
while True:
    if os.fork() == 0:  # raises once the run has all the processes it may have
        time.sleep(60)
        os._exit(0)
"""


async def test_a_run_stopped_at_the_process_limit_fails_as_pids(python: PythonExecutor) -> None:
    outcome = await python.run(request(FORK_UNTIL_REFUSED), asyncio.Event())
    assert outcome.kind == "failed", describe(outcome)
    assert outcome.error is not None
    assert outcome.error.kind == "pids", describe(outcome)
    assert f"{LIMITS.processes} processes" in outcome.error.message
    assert not outcome.retryable


MANY_FILES = """
import json, os
count = 0
try:
    for n in range(100_000):
        open(f"/tmp/f{n}", "w").close()
        count += 1
except OSError:
    pass
print(json.dumps(count))
"""


async def test_a_hundred_thousand_files_are_refused(python: PythonExecutor) -> None:
    count = await report(python, request(MANY_FILES, seconds=120))
    assert isinstance(count, int)
    assert count <= LIMITS.tmp_files, count


HOLD_MEMORY = """
import json, os, select, time
size = data["each"]
r, w = os.pipe()
children = []
for _ in range(data["processes"]):
    pid = os.fork()
    if pid == 0:
        os.close(r)
        held = bytearray(size)
        for i in range(0, size, 4096):  # touch every page: resident, not just reserved
            held[i] = 1
        os.write(w, b"1")
        time.sleep(120)
        os._exit(0)
    children.append(pid)
os.close(w)
holding = 0
give_up = time.monotonic() + 20
while time.monotonic() < give_up and holding < len(children):
    if not select.select([r], [], [], 0.5)[0]:
        continue
    got = os.read(r, 64)
    if not got:
        break
    holding += len(got)
time.sleep(1)  # give the OOM killer its chance at the last allocation
alive = sum(1 for pid in children if os.waitpid(pid, os.WNOHANG) == (0, 0))
print(json.dumps({"reported": holding, "alive": alive}))
"""


async def test_memory_is_bounded_across_processes(python: PythonExecutor) -> None:
    each = 64 * MiB
    data = {"processes": 8, "each": each}
    outcome = await python.run(request(HOLD_MEMORY, data, seconds=60), asyncio.Event())
    if outcome.kind == "failed":  # the OOM killer may pick the parent: a clear failure
        assert outcome.error is not None
        assert outcome.error.kind == "memory_limit", describe(outcome)
        return
    assert outcome.kind == "completed", describe(outcome)
    assert outcome.result is not None
    got = json.loads(outcome.result.stdout)
    assert got["alive"] * each <= LIMITS.memory_bytes, got


async def test_an_oom_kill_is_a_memory_limit_failure(python: PythonExecutor) -> None:
    # Two processes each under the per-process cap, together over the run's memory.
    code = (
        "import os\n"
        f"size = {LIMITS.memory_bytes * 3 // 4}\n"
        "pid = os.fork()\n"
        "held = bytearray(size)\n"
        "for i in range(0, size, 4096):\n"
        "    held[i] = 1\n"
        "if pid:\n"
        "    _, status = os.waitpid(pid, 0)\n"
        "    raise SystemExit(0 if status == 0 else 1)\n"
    )
    outcome = await python.run(request(code, seconds=60), asyncio.Event())
    assert outcome.kind == "failed", describe(outcome)
    assert outcome.error is not None
    assert outcome.error.kind == "memory_limit", describe(outcome)
    assert "memory" in outcome.error.message


BURN_CPU = """
import json, os, time
r, w = os.pipe()
for _ in range(data["processes"]):
    if os.fork() == 0:
        end = time.monotonic() + data["seconds"]
        while time.monotonic() < end:
            pass
        os.write(w, f"{time.process_time():.3f}\\n".encode())
        os._exit(0)
os.close(w)
started = time.monotonic()
for _ in range(data["processes"]):
    os.wait()
out = b""
while chunk := os.read(r, 4096):
    out += chunk
print(json.dumps({"cpu": sum(map(float, out.split())), "wall": time.monotonic() - started}))
"""


async def test_cpu_is_bounded_by_the_quota(python: PythonExecutor) -> None:
    got = await report(python, request(BURN_CPU, {"processes": 6, "seconds": 3}, seconds=60))
    assert isinstance(got, dict)
    cpu, wall = got["cpu"], got["wall"]
    assert isinstance(cpu, float)
    assert isinstance(wall, float)
    assert cpu <= LIMITS.cpus * wall * 1.2 + 0.3, got


# -- the kernel's doors ---------------------------------------------------------------------

SYSCALLS = """
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
got = {}
def attempt(name, call):
    ctypes.set_errno(0)
    result = call()
    got[name] = "allowed" if result >= 0 else os.strerror(ctypes.get_errno())
attempt("user namespace", lambda: libc.unshare(0x10000000))
params = ctypes.create_string_buffer(120)
attempt("io_uring_setup", lambda: libc.syscall(425, 8, params))
pid = os.fork()
if pid == 0:
    os._exit(0 if libc.ptrace(0, 0, None, None) == 0 else 1)  # PTRACE_TRACEME
_, status = os.waitpid(pid, 0)
got["ptrace"] = "allowed" if status == 0 else "refused"
attempt("mount", lambda: libc.mount(b"none", b"/tmp", b"tmpfs", 0, None))
attempt("setuid 0", lambda: libc.setuid(0))
attempt("bpf", lambda: libc.syscall(321, 0, None, 0))
attempt("keyctl", lambda: libc.syscall(250, 0, 0, 0, 0, 0))
print(json.dumps(got))
"""


async def test_namespaces_io_uring_ptrace_and_friends_are_refused(python: PythonExecutor) -> None:
    got = await report(python, request(SYSCALLS))
    assert isinstance(got, dict)
    assert "allowed" not in got.values(), got
    assert got["user namespace"] == os.strerror(1)  # EPERM: an ordinary error
    assert got["io_uring_setup"] == os.strerror(1)


LIST_PROC = """
import json, os
pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
print(json.dumps({"pids": pids, "me": os.getpid()}))
"""


async def test_proc_lists_only_the_runs_own_processes(python: PythonExecutor) -> None:
    got = await report(python, request(LIST_PROC))
    assert isinstance(got, dict)
    assert got["pids"] == [got["me"]] == [1], got


STILL_BLOCKED = """
import json, os, socket
got = {}
for name, family, kind in [("tcp", socket.AF_INET, socket.SOCK_STREAM),
                           ("udp", socket.AF_INET, socket.SOCK_DGRAM),
                           ("ipv6", socket.AF_INET6, socket.SOCK_STREAM)]:
    try:
        s = socket.socket(family, kind)
        s.settimeout(2)
        s.connect(("1.1.1.1", 53) if family == socket.AF_INET else ("::1", 5432))
        got[name] = "connected"
    except OSError as e:
        got[name] = "refused"
try:
    socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    got["raw"] = "opened"
except OSError:
    got["raw"] = "refused"
for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            if data.encode() in f.read():
                got[f"/proc/{pid}/environ"] = "the worker's secret"
    except OSError:
        pass
for path in ("/etc/shadow", "/root/.bashrc"):
    try:
        open(path, "rb").read(1)
        got[path] = "read"
    except OSError:
        got[path] = "refused"
print(json.dumps(got))
"""


async def test_what_was_blocked_stays_blocked(
    python: PythonExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = f"hunter2-{secrets.token_hex(4)}"
    monkeypatch.setenv("TASKLEDGER_ATTACK_SECRET", secret)
    got = await report(python, request(STILL_BLOCKED, secret))
    assert isinstance(got, dict)
    assert set(got.values()) == {"refused"}, got


async def test_the_root_is_read_only_and_small(python: PythonExecutor) -> None:
    code = (
        "import json, os\n"
        "got = {'listing': sorted(os.listdir('/')), 'writable': []}\n"
        "for place in ('/', '/usr', '/etc', '/usr/bin'):\n"
        "    try:\n"
        "        open(os.path.join(place, 'x'), 'w').close()\n"
        "        got['writable'].append(place)\n"
        "    except OSError:\n"
        "        pass\n"
        "print(json.dumps(got))\n"
    )
    got = await report(python, request(code))
    assert isinstance(got, dict)
    assert got["writable"] == []
    listing = got["listing"]
    assert isinstance(listing, list)
    for host_only in ("root", "home", "srv", "opt", "run", "work", "boot", "mnt"):
        assert host_only not in listing, listing


LEAVE_EVERYTHING = """
import ctypes, os, time
libc = ctypes.CDLL(None, use_errno=True)
for place in ("/tmp", "/var/tmp", "/dev/shm", "/task"):
    with open(os.path.join(place, "left"), "w") as f:
        f.write("x")
libc.shmget(0x7a5d, 4096, 0o1600)  # SysV shared memory, a message queue, semaphores
libc.msgget(0x7a5d, 0o1600)
libc.semget(0x7a5d, 1, 0o1600)
if os.fork() == 0:  # a daemon: its own session, its own child, holding nothing
    os.setsid()
    if os.fork() == 0:
        for fd in (0, 1, 2):
            os.close(fd)
        while True:
            time.sleep(1)
    os._exit(0)
os.wait()
print("left")
"""


def owned_by(uid: int, *places: Path) -> list[str]:
    """What `uid` owns in these directories (what it could make there is at their top)."""
    found = []
    for place in places:
        for path in [place, *place.iterdir()] if place.exists() else []:
            try:
                if path.lstat().st_uid == uid:
                    found.append(str(path))
            except OSError:
                continue
    return found


def sysv_ipc_of(uid: int) -> list[str]:
    rows = []
    for kind in ("shm", "msg", "sem"):
        lines = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()
        header = lines[0].split()
        rows += [
            f"{kind}: {line}" for line in lines[1:] if int(line.split()[header.index("uid")]) == uid
        ]
    return rows


async def test_nothing_of_the_slot_user_survives_a_run(python: PythonExecutor) -> None:
    sandbox = python.sandbox
    uid = sandbox.slot_uid(1)
    assert uid is not None
    outcome = await python.run(request(LEAVE_EVERYTHING, slot=1), asyncio.Event())
    assert outcome.result is not None, describe(outcome)
    assert outcome.result.stdout == "left\n"
    assert uid_processes(uid, zombies=True) == []
    places = [Path(p) for p in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")]
    assert owned_by(uid, *places) == []
    assert not any(sandbox.work_dir.rglob("run-*"))
    assert sysv_ipc_of(uid) == []
