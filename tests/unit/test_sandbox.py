"""The sandbox's and executors' pure parts: output capture, exit descriptions, reports,
limits, cgroup files on a described machine, the layer table, the seccomp filter."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from workers.executors.base import RunRequest
from workers.executors.csharp import _unhandled_exception
from workers.executors.echo import EchoExecutor
from workers.executors.outcome import exit_description, outcome
from workers.executors.python import _reported
from workers.sandbox import Ended, Layer, Limits, MiB, Sandbox, cgroups, layers, seccomp
from workers.sandbox.capture import OutputCapture
from workers.sandbox.cgroups import Counters, SlotCgroup
from workers.sandbox.child.bootstrap import parse_json
from workers.sandbox.processes import limit_hit
from workers.sandbox.programs import memfd

LIMITS = Limits()


def ended(returncode: int | None, how: str = "exited", stderr: bytes = b"") -> Ended:
    return Ended(how, returncode, b"out", stderr, False, b"", 1.5)  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_capture_keeps_the_cap_and_drains_the_rest() -> None:
    read_end, write_end = os.pipe()
    capture = await OutputCapture.attach(read_end, 10)

    def write_and_close() -> None:  # more than a pipe's buffer: the reader must keep up
        for chunk in (b"abcdef", b"ghijkl", b"x" * 1_000_000):
            view = memoryview(chunk)
            while view:
                view = view[os.write(write_end, view) :]
        os.close(write_end)

    writer = asyncio.get_running_loop().run_in_executor(None, write_and_close)
    await OutputCapture.drain(capture)
    await writer
    assert capture.data() == b"abcdefghij"
    assert capture.truncated


@pytest.mark.asyncio
async def test_capture_under_the_cap_is_whole() -> None:
    read_end, write_end = os.pipe()
    capture = await OutputCapture.attach(read_end, 10)
    os.write(write_end, b"0123456789")
    os.close(write_end)
    await OutputCapture.drain(capture)
    assert capture.data() == b"0123456789"
    assert not capture.truncated


def test_memfd_reads_from_the_start() -> None:
    fd = memfd("t", b'{"a": 1}')
    try:
        assert os.read(fd, 100) == b'{"a": 1}'
    finally:
        os.close(fd)


def test_parse_json_without_the_json_module_matches_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "json")  # as in a spawned interpreter
    for text in ('{"a": [1, 2.5, "\\u00e9", null, true, false]}', "  3 ", '"x"', "[NaN]"):
        parsed = parse_json(text)
        assert repr(parsed) == repr(json.loads(text))
    for bad in ("", "{", "1 2", "[1,]"):
        with pytest.raises(ValueError, match=r"JSON|Expecting|extra"):
            parse_json(bad)


def test_exit_descriptions() -> None:
    assert exit_description(3, LIMITS) == "exit status 3"
    assert exit_description(-signal.SIGKILL, LIMITS) == "killed by SIGKILL"
    assert exit_description(-signal.SIGXCPU, LIMITS).startswith("killed by SIGXCPU (CPU time")
    assert exit_description(-signal.SIGSEGV, LIMITS) == "killed by SIGSEGV"


def test_outcomes() -> None:
    done = outcome(ended(0), LIMITS)
    assert done.kind == "completed"
    assert done.result is not None
    assert (done.result.stdout, done.result.duration_ms) == ("out", 1.5)
    failed = outcome(ended(2, stderr=b"bad \xff"), LIMITS)
    assert failed.kind == "failed"
    assert failed.retryable
    assert failed.error is not None
    assert (failed.error.message, failed.error.stderr) == ("exit status 2", "bad \ufffd")
    assert outcome(ended(None, "expired"), LIMITS).kind == "expired"
    assert outcome(ended(None, "cancelled"), LIMITS).kind == "cancelled"


def test_python_report_parsing() -> None:
    assert _reported(b"") == (None, None)
    assert _reported(b'{"kind": "exception", "message": "ValueError: x"}\n') == (
        "exception",
        "ValueError: x",
    )
    assert _reported(b"garbage\n") == (None, None)


def test_mono_unhandled_exception_line() -> None:
    stderr = b"\nUnhandled Exception:\nSystem.Exception: boom\n  at P.Main () [0x0]\n"
    assert _unhandled_exception(ended(1, stderr=stderr)) == "System.Exception: boom"
    assert _unhandled_exception(ended(1, stderr=b"other\n")) is None


@pytest.mark.asyncio
async def test_echo_returns_the_data() -> None:
    echo = EchoExecutor()
    deadline = datetime.now(UTC) + timedelta(seconds=5)
    req = RunRequest(uuid.uuid4(), 1, "", {"k": [1, "two"]}, deadline, 0)
    done = await echo.run(req, asyncio.Event())
    assert done.kind == "completed"
    assert done.result is not None
    assert done.result.stdout == '{"k":[1,"two"]}'
    cancelled = asyncio.Event()
    cancelled.set()
    assert (await echo.run(req, cancelled)).kind == "cancelled"
    late = RunRequest(uuid.uuid4(), 1, "", None, datetime.now(UTC) - timedelta(seconds=1), 0)
    assert (await echo.run(late, asyncio.Event())).kind == "expired"


def test_sandbox_needs_a_slot_and_a_start() -> None:
    with pytest.raises(ValueError, match="at least one slot"):
        Sandbox(0)
    with pytest.raises(RuntimeError, match="start"):
        _ = Sandbox(1).capabilities


# -- limits, and which limit a run hit ------------------------------------------------------


def test_limits_refuse_nonsense_and_give_rlimits() -> None:
    with pytest.raises(ValueError, match="memory_bytes"):
        Limits(memory_bytes=0)
    with pytest.raises(ValueError, match="cpus"):
        Limits(cpus=0)
    limits = Limits(memory_bytes=100 * MiB, tmp_bytes=8 * MiB, processes=10)
    pairs = limits.rlimits(per_user=True)
    assert pairs["RLIMIT_AS"] == (100 * MiB, 100 * MiB)
    assert pairs["RLIMIT_FSIZE"] == (8 * MiB, 8 * MiB)  # a file may fill its tmpfs, no more
    assert pairs["RLIMIT_NPROC"] == (10, 10)
    assert "RLIMIT_NPROC" not in limits.rlimits(per_user=False)  # root ignores it


def test_each_limit_says_what_it_is_and_its_setting() -> None:
    limits = Limits(memory_bytes=100 * MiB, processes=10, tmp_bytes=8 * MiB, cpu_seconds=5)
    assert "100 MiB" in limits.describe("memory_limit")
    assert "memory_mib" in limits.describe("memory_limit")
    assert "10 processes" in limits.describe("pids")
    assert "8 MiB" in limits.describe("disk_full")
    assert "tmp_mib" in limits.describe("disk_full")
    assert limits.describe("cpu") == "the run used its 5 s of CPU time"


def test_the_limit_a_failed_run_hit() -> None:
    none = Counters()
    assert limit_hit(none, Counters(oom_kills=1), ["/tmp"], -9) == "memory_limit"
    assert limit_hit(none, Counters(pids_refused=3), ["/tmp"], 1) == "pids"
    assert limit_hit(none, none, ["/dev/shm"], 1) == "disk_full"
    assert limit_hit(none, none, [], -signal.SIGXCPU) == "cpu"
    assert limit_hit(none, none, [], -signal.SIGXFSZ) == "disk_full"
    assert limit_hit(Counters(2, 2), Counters(2, 2), [], 1) is None  # counts from before


def test_a_limit_failure_is_permanent_and_named() -> None:
    hit = Ended("exited", -9, b"", b"Killed", False, b"", 3.0, limit="memory_limit")
    failed = outcome(hit, LIMITS)
    assert failed.kind == "failed"
    assert not failed.retryable
    assert failed.error is not None
    assert failed.error.kind == "memory_limit"
    assert "512 MiB" in failed.error.message


# -- cgroups, on a described machine ---------------------------------------------------------

V1_MOUNTS = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
36 31 0:33 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V2_MOUNTS = "30 23 0:26 / /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw\n"


def fake_tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_cgroups_v1_when_v2_offers_no_controllers(tmp_path: Path) -> None:
    fake_tree(tmp_path, {"sys/fs/cgroup/unified/cgroup.controllers": "hugetlb\n"})
    for name in ("cpu", "memory", "pids"):
        (tmp_path / "sys/fs/cgroup" / name).mkdir(parents=True)
    found = cgroups.find(V1_MOUNTS, "0::/\n4:memory:/\n", tmp_path)
    assert found.version == 1
    assert found.bases["memory"] == tmp_path / "sys/fs/cgroup/memory/taskledger"
    assert set(found.bases) == {"memory", "pids", "cpu"}
    assert not found.missing


def test_cgroups_v2_under_the_workers_own_cgroup(tmp_path: Path) -> None:
    fake_tree(tmp_path, {"sys/fs/cgroup/app/cgroup.controllers": "cpuset cpu io memory pids\n"})
    found = cgroups.find(V2_MOUNTS, "0::/app\n", tmp_path, mount_private=False)
    assert found.version == 2
    assert found.bases["cpu"] == tmp_path / "sys/fs/cgroup/app/taskledger"


def test_a_read_only_v2_is_mounted_again_privately(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As in a container: its cgroupfs is read-only, its own cgroup namespace is not."""
    fake_tree(tmp_path, {"sys/fs/cgroup/cgroup.controllers": "cpu io memory pids\n"})
    private = tmp_path / "private"
    monkeypatch.setattr(os, "access", lambda path, mode: str(path).startswith(str(private)))
    mounted: list[Path] = []

    def mount(point: Path, fstype: str, options: str) -> tuple[Path | None, str]:
        mounted.append(point)
        assert (fstype, options) == ("cgroup2", "")
        return private, ""

    monkeypatch.setattr(cgroups, "_mount_private", mount)
    found = cgroups.find(V2_MOUNTS, "0::/\n", tmp_path)
    assert mounted == [cgroups.PRIVATE_V2]
    assert found.version == 2
    assert found.bases["memory"] == private / "taskledger"
    monkeypatch.setattr(cgroups, "_mount_private", lambda *args: (None, "EPERM (test)"))
    refused = cgroups.find(V2_MOUNTS, "0::/\n", tmp_path)
    assert not refused.bases
    assert "EPERM (test)" in refused.missing["memory"]


def test_read_only_v1_hierarchies_are_mounted_again_privately(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As in a container on a cgroup v1 host: each controller's hierarchy is mounted
    again, naming every controller it binds (`cpu,cpuacct`: `cpu` alone is refused)."""
    mounts = V1_MOUNTS.replace("rw,cpu\n", "rw,cpu,cpuacct\n")
    mounts = mounts.replace("cgroup/cpu ", "cgroup/cpu,cpuacct ")
    fake_tree(tmp_path, {"sys/fs/cgroup/unified/cgroup.controllers": ""})
    private = tmp_path / "private"
    monkeypatch.setattr(os, "access", lambda path, mode: str(path).startswith(str(private)))
    mounted: list[tuple[Path, str, str]] = []

    def mount(point: Path, fstype: str, options: str) -> tuple[Path | None, str]:
        mounted.append((point, fstype, options))
        return private / point.name, ""

    monkeypatch.setattr(cgroups, "_mount_private", mount)
    found = cgroups.find(mounts, "0::/\n", tmp_path)
    assert found.version == 1
    assert not found.missing
    assert sorted(mounted) == sorted(
        (cgroups.PRIVATE / f"cgroup-{options}", "cgroup", options)
        for options in ("cpu,cpuacct", "memory", "pids")
    )
    assert found.bases["cpu"] == private / "cgroup-cpu,cpuacct" / "taskledger"
    assert found.bases["memory"] == private / "cgroup-memory" / "taskledger"

    monkeypatch.setattr(cgroups, "_mount_private", lambda *args: (None, "EPERM (test)"))
    refused = cgroups.find(mounts, "0::/\n", tmp_path)
    assert not refused.bases
    assert "sys/fs/cgroup/memory is read-only, and EPERM (test)" in refused.missing["memory"]
    kept = cgroups.find(mounts, "0::/\n", tmp_path, mount_private=False)
    assert "is not writable" in kept.missing["pids"]


def test_cgroups_missing_say_why(tmp_path: Path) -> None:
    fake_tree(tmp_path, {"sys/fs/cgroup/cgroup.controllers": "cpu io\n"})
    found = cgroups.find(V2_MOUNTS, "0::/\n", tmp_path)
    assert found.version == 0  # nothing usable: v2 lacks them, and there is no v1
    assert not found.bases
    assert "does not offer memory, pids" in found.missing["memory"]
    assert "no v1 hierarchy" in found.missing["pids"]


def test_a_v1_slot_cgroup_writes_its_limits_and_reads_its_counters(tmp_path: Path) -> None:
    paths = {name: tmp_path / name / "taskledger" / "tlsbx0" for name in ("memory", "pids", "cpu")}
    fake_tree(
        tmp_path,
        {
            "memory/taskledger/tlsbx0/memory.limit_in_bytes": "",
            "memory/taskledger/tlsbx0/memory.oom_control": "oom_kill_disable 0\nunder_oom 0\n"
            "oom_kill 3\n",
            "pids/taskledger/tlsbx0/pids.events": "max 7\n",
            "pids/taskledger/tlsbx0/cgroup.procs": "",
            "cpu/taskledger/tlsbx0/cpu.cfs_period_us": "",
        },
    )
    cgroup = SlotCgroup(1, paths)
    cgroup.configure(256 * MiB, 64, 0.5)
    assert (paths["memory"] / "memory.limit_in_bytes").read_text() == str(256 * MiB)
    assert not (paths["memory"] / "memory.memsw.limit_in_bytes").exists()  # no swap account
    assert (paths["pids"] / "pids.max").read_text() == "64"
    assert (paths["cpu"] / "cpu.cfs_quota_us").read_text() == "50000"
    assert (paths["cpu"] / "cpu.cfs_period_us").read_text() == "100000"
    assert cgroup.counters() == Counters(oom_kills=3, pids_refused=7)
    assert len(cgroup.procs_files) == 3


def test_a_v2_slot_cgroup_writes_its_limits_and_reads_its_counters(tmp_path: Path) -> None:
    fake_tree(
        tmp_path,
        {"memory.events": "low 0\nhigh 0\nmax 4\noom 2\noom_kill 2\n", "pids.events": "max 1\n"},
    )
    cgroup = SlotCgroup(2, dict.fromkeys(("memory", "pids", "cpu"), tmp_path))
    cgroup.configure(128 * MiB, 32, 2.0)
    assert (tmp_path / "memory.max").read_text() == str(128 * MiB)
    assert (tmp_path / "pids.max").read_text() == "32"
    assert (tmp_path / "cpu.max").read_text() == "200000 100000"
    assert cgroup.counters() == Counters(oom_kills=2, pids_refused=1)
    assert cgroup.procs_files == [str(tmp_path / "cgroup.procs")]


# -- layers and seccomp --------------------------------------------------------------------


def test_the_layer_table_and_the_refusal_name_what_is_missing() -> None:
    found = [
        Layer(layers.MOUNT_NS, True, "a read-only root"),
        Layer(layers.CGROUP_MEMORY, False, "no v1 hierarchy has it"),
    ]
    text = layers.table(found)
    assert "mount namespace" in text
    assert "MISSING  no v1 hierarchy has it" in text
    refusal = layers.refusal(found)
    assert "missing cgroup memory (no v1 hierarchy has it)" in refusal
    assert "allow_unisolated" in refusal
    assert "mount namespace" not in refusal


def test_the_seccomp_filter_compiles_for_this_machine() -> None:
    built = seccomp.build()
    assert built.bpf
    assert len(built.bpf) % 8 == 0  # struct sock_filter[]
    for name in ("unshare", "setns", "io_uring_setup", "bpf", "keyctl", "mount", "ptrace"):
        assert name in built.denied
    assert "clone3" not in built.denied  # ENOSYS, not EPERM: C libraries fall back to clone
