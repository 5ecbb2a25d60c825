"""The sandbox's layers as an operator meets them: the check, the refusal without a layer
and the explicit opt-in, and the sweep after a worker was killed.

Real processes as root (fails in CI when not root, skipped elsewhere).
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from taskledger.cli import main
from tests import services
from tests.sandboxing import request
from workers.executors.python import PythonExecutor
from workers.sandbox import Sandbox, cgroups, layers, uid_processes
from workers.sandbox.cgroups import Found

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def as_root() -> None:
    if os.geteuid() != 0:
        services.unavailable("root", "the isolated sandbox needs root (slot users, namespaces)")


@pytest.fixture
def no_cgroups(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine whose cgroup controllers cannot be had (a container without delegation)."""
    why = "not delegated to this worker (test)"
    hidden = Found(0, {}, dict.fromkeys(cgroups.CONTROLLERS, why))
    monkeypatch.setattr(cgroups, "find", lambda: hidden)


def test_check_sandbox_lists_every_layer_active() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "taskledger", "worker", "--check-sandbox", "--concurrency", "1"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for name in layers.ORDER:
        row = next(line for line in lines if line.startswith(name + " "))
        assert row.split()[len(name.split())] == "active", row
    assert "programs run isolated (zygote)" in result.stdout


def test_check_sandbox_fails_naming_a_missing_layer(
    no_cgroups: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["worker", "--check-sandbox", "--concurrency", "1"]) == 1
    out = capsys.readouterr().out
    assert "cgroup memory      MISSING  not delegated to this worker (test)" in out
    assert "MISSING: cgroup memory, cgroup pids, cgroup cpu." in out
    assert "mount namespace    active" in out


@pytest.mark.asyncio
async def test_without_a_layer_programs_are_refused_unless_allowed(
    no_cgroups: None, tmp_path: Path
) -> None:
    refusing = Sandbox(1, work_dir=tmp_path / "work")
    try:
        caps = await refusing.start()
        assert caps.isolated  # namespaces are there; cgroups are not
        outcome = await PythonExecutor(refusing).run(request("print('x')"), asyncio.Event())
    finally:
        await refusing.close()
    assert outcome.kind == "failed"
    assert not outcome.retryable
    assert outcome.error is not None
    assert outcome.error.kind == "sandbox_unavailable"
    assert "cgroup memory (not delegated to this worker (test))" in outcome.error.message
    allowing = Sandbox(1, work_dir=tmp_path / "work", allow_unisolated=True)
    try:
        assert (await allowing.start()).refusal is None
        code = "import os\nprint(os.getpid(), os.getcwd())"
        outcome = await PythonExecutor(allowing).run(request(code), asyncio.Event())
    finally:
        await allowing.close()
    assert outcome.result is not None
    assert outcome.result.stdout == "1 /task\n"  # still in its namespaces, without cgroups


# A worker with one slot, running a program that sleeps: it prints the run's directory on
# the host and its slot user's uid, then waits to be killed.
RUNNING_WORKER = """
import asyncio, sys
from pathlib import Path
from workers.sandbox import PythonSource, Sandbox, uid_processes

async def main():
    sandbox = Sandbox(1, work_dir=Path(sys.argv[1]))
    await sandbox.start()
    uid = sandbox.slot_uid(0)
    async with sandbox.workspace(0) as workspace:
        run = asyncio.ensure_future(sandbox.run(
            workspace, PythonSource(b"import time; time.sleep(600)"), stdin=b"null",
            deadline=asyncio.get_running_loop().time() + 600, cancelled=asyncio.Event()))
        while not uid_processes(uid):
            await asyncio.sleep(0.01)
        print(workspace.path, uid, sandbox._zygotes.serving[0].process.pid, flush=True)
        await run

asyncio.run(main())
"""


def start_running_worker(work_dir: Path) -> tuple[subprocess.Popen[str], Path, int, int]:
    worker = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(RUNNING_WORKER), str(work_dir)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert worker.stdout is not None
    path, uid, zygote = worker.stdout.readline().split()
    return worker, Path(path), int(uid), int(zygote)


@pytest.mark.asyncio
@pytest.mark.parametrize("killed", ["the worker", "the worker and its zygote"])
async def test_a_killed_workers_runs_are_swept(killed: str, tmp_path: Path) -> None:
    work_dir = tmp_path / "work"
    worker, run_dir, uid, zygote = start_running_worker(work_dir)
    assert run_dir.is_dir()
    if killed == "the worker and its zygote":
        os.kill(zygote, signal.SIGKILL)
    worker.send_signal(signal.SIGKILL)
    worker.wait(10)
    assert worker.stdout is not None
    worker.stdout.close()
    # Left by the layout before this one: a run directory owned by a slot user.
    legacy = []
    for entry in pwd.getpwall():
        if entry.pw_name.startswith("tlsbx"):
            old = work_dir / f"slot0-{entry.pw_name}"
            old.mkdir()
            os.chown(old, entry.pw_uid, entry.pw_gid)
            legacy.append((old, entry.pw_uid))
    sandbox = Sandbox(1, work_dir=work_dir)
    try:
        caps = await sandbox.start()
        assert caps.users[0].uid == uid  # the dead worker's slot user, free again
        assert not run_dir.exists(), f"{run_dir} survived {killed}"
        assert not uid_processes(uid)
        mine = caps.users[0].uid
        for old, owner in legacy:
            assert old.exists() == (owner != mine), old
        outcome = await PythonExecutor(sandbox).run(request("print('after')"), asyncio.Event())
        assert outcome.result is not None
        assert outcome.result.stdout == "after\n"
    finally:
        await sandbox.close()


@pytest.mark.asyncio
async def test_each_slot_has_a_zygote_named_for_ps(tmp_path: Path) -> None:
    """`ps -ef` shows a short, recognisable command line, `pgrep tl-zygote` finds them
    (issue 19: its command line used to be its whole source), and each zygote lives in its
    slot's cgroups."""
    sandbox = Sandbox(2, work_dir=tmp_path / "work")
    try:
        await sandbox.start()
        zygotes = sandbox._zygotes.serving
        assert sorted(zygotes) == [0, 1]
        for slot, zygote in zygotes.items():
            pid = zygote.process.pid
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
            assert argv[1:3] == [b"-I", b"-S"]
            assert argv[3].endswith(b"workers/sandbox/child/zygote.py")
            assert argv[4] == b"serve"
            assert len(b" ".join(argv)) < 200
            assert Path(f"/proc/{pid}/comm").read_text() == "tl-zygote\n"
            assert pid in sandbox._cgroups[slot].pids()
    finally:
        await sandbox.close()


# As in a container on a cgroup v1 host (podman/Docker with `cgroup: private`): its own
# cgroup namespace, and every cgroupfs mount read-only. The worker must mount its
# controllers' hierarchies again, writable, and bound its runs with them.
READ_ONLY_CGROUPS = """
set -e
for mount in $(awk '$3 ~ /^cgroup2?$/ {print $2}' /proc/mounts) /sys/fs/cgroup; do
    mount -o remount,ro,bind "$mount"
done
exec "$@"
"""

IN_A_CONTAINER = """
import asyncio, json, sys
from pathlib import Path
from tests.sandboxing import request
from workers.executors.python import PythonExecutor
from workers.sandbox import Limits, Sandbox, cgroups
MiB = 1024 * 1024
limits = Limits(memory_bytes=128 * MiB, processes=64)
code = (
    "import os\\n"
    f"size = {96 * MiB}\\n"  # two processes, each under the per-process cap, over the run's
    "pid = os.fork()\\n"
    "held = bytearray(size)\\n"
    "for i in range(0, size, 4096):\\n"
    "    held[i] = 1\\n"
    "if pid:\\n"
    "    _, status = os.waitpid(pid, 0)\\n"
    "    raise SystemExit(0 if status == 0 else 1)\\n"
)
async def main():
    sandbox = Sandbox(1, work_dir=Path(sys.argv[1]), limits=limits)
    try:
        await sandbox.start()
        paths = {name: str(path) for name, path in sandbox._cgroups[0].paths.items()}
        outcome = await PythonExecutor(sandbox).run(request(code, seconds=60), asyncio.Event())
        error = outcome.error.kind if outcome.error else None
        print(json.dumps({"paths": paths, "kind": outcome.kind, "error": error}))
    finally:
        await sandbox.close()
asyncio.run(main())
"""


def as_in_a_container(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`argv` in a mount and a cgroup namespace of its own, every cgroupfs read-only."""
    namespaces = ["unshare", "--mount", "--cgroup", "--fork", "--"]
    return subprocess.run(
        [*namespaces, "sh", "-c", READ_ONLY_CGROUPS, "sh", *argv],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )


def test_a_worker_with_read_only_cgroups_mounts_its_own_and_bounds_runs(tmp_path: Path) -> None:
    probe = as_in_a_container("sh", "-c", "touch /sys/fs/cgroup/memory/x 2>&1 || true")
    assert "Read-only file system" in probe.stdout + probe.stderr, probe  # the situation holds

    check = as_in_a_container(
        sys.executable, "-m", "taskledger", "worker", "--check-sandbox", "--concurrency", "1"
    )
    assert check.returncode == 0, check.stdout + check.stderr
    for name in ("cgroup memory", "cgroup pids", "cgroup cpu"):
        row = next(line for line in check.stdout.splitlines() if line.startswith(name + " "))
        assert row.split()[2] == "active", row
        assert str(cgroups.PRIVATE) in row, row

    run = as_in_a_container(sys.executable, "-c", IN_A_CONTAINER, str(tmp_path / "work"))
    assert run.returncode == 0, run.stdout + run.stderr
    got = json.loads(run.stdout.splitlines()[-1])
    assert all(path.startswith(str(cgroups.PRIVATE)) for path in got["paths"].values()), got
    assert (got["kind"], got["error"]) == ("failed", "memory_limit"), got
