"""A cgroup per slot: memory, processes and CPU bounded for all of a run's processes
together, and counters that say which bound a run hit.

cgroup v2 is used where its `memory`, `pids` and `cpu` controllers can be had (the
worker's own cgroup is delegated: a container with its own cgroup namespace, or a
systemd unit with `Delegate=yes`); otherwise the v1 hierarchies of those controllers
(`/sys/fs/cgroup/memory`, …). A container's cgroupfs is mounted read-only, v1 or v2: a
worker with CAP_SYS_ADMIN mounts the same hierarchy again, writable, under PRIVATE (in
its own cgroup namespace that mount is rooted at the container's cgroup). A controller
found nowhere is reported missing, and the sandbox runs without it only if the operator
opted in.

A run's first process joins by writing `0` to each `cgroup.procs` (`procs_files`) before
it drops root; everything it starts stays in the cgroup. The slot's cgroup is named after
its slot user (`taskledger/tlsbx0`): a user belongs to one worker at a time, so does its
cgroup.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

CONTROLLERS = ("memory", "pids", "cpu")
# Every v1 controller a hierarchy may bind (its super options also hold rw, name=, …).
KERNEL_CONTROLLERS = frozenset(
    {"cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "net_cls", "net_prio"}
    | {"blkio", "perf_event", "hugetlb", "pids", "rdma", "misc"}
)
GROUP = "taskledger"
CPU_PERIOD_US = 100_000
V2_LEAF = "taskledger-worker"  # where v2 delegation moves the worker's own processes
PRIVATE = Path("/run/taskledger-sandbox")  # our own cgroup mounts, where we need them
PRIVATE_V2 = PRIVATE / "cgroup"  # cgroup2
KILL_WAIT_SECONDS = 5.0


class CgroupError(Exception):
    """A cgroup could not be made or configured (the message says which file and why)."""


@dataclass(frozen=True)
class Counters:
    """Cumulative counts of a slot's cgroup; compare before and after a run."""

    oom_kills: int = 0  # processes the OOM killer ended at the memory limit
    pids_refused: int = 0  # forks and clones refused at the process limit


@dataclass(frozen=True)
class Found:
    """What the machine offers: each controller's directory for our cgroups, or why not."""

    version: int  # 2 or 1 (0: none usable)
    bases: Mapping[str, Path]  # controller -> the directory our slot cgroups go under
    missing: Mapping[str, str]  # controller -> why it cannot be used


class SlotCgroup:
    """The cgroup(s) of one slot: one directory per v1 controller, or one v2 directory."""

    def __init__(self, version: int, paths: Mapping[str, Path]) -> None:
        self.version = version
        self.paths = dict(paths)  # controller -> its directory for this slot

    @property
    def procs_files(self) -> list[str]:
        """The cgroup.procs a run's first process writes itself into (one per directory)."""
        return sorted({str(path / "cgroup.procs") for path in self.paths.values()})

    @property
    def controllers(self) -> tuple[str, ...]:
        return tuple(name for name in CONTROLLERS if name in self.paths)

    def configure(self, memory_bytes: int, pids: int, cpus: float) -> None:
        """Write the limits (the slot's cgroups exist)."""
        quota = max(1_000, round(cpus * CPU_PERIOD_US))
        if self.version == 2:
            path = self.paths[next(iter(self.paths))]
            if "memory" in self.paths:
                _write(path / "memory.max", memory_bytes)
                _write_if_present(path / "memory.swap.max", 0)
            if "pids" in self.paths:
                _write(path / "pids.max", pids)
            if "cpu" in self.paths:
                _write(path / "cpu.max", f"{quota} {CPU_PERIOD_US}")
            return
        if "memory" in self.paths:
            memory = self.paths["memory"]
            swap = memory / "memory.memsw.limit_in_bytes"
            # memsw may never be below the plain limit: raise in one order, lower in the
            # other, whichever order this change needs.
            try:
                _write(memory / "memory.limit_in_bytes", memory_bytes)
                _write_if_present(swap, memory_bytes)
            except CgroupError:
                _write_if_present(swap, memory_bytes)
                _write(memory / "memory.limit_in_bytes", memory_bytes)
        if "pids" in self.paths:
            _write(self.paths["pids"] / "pids.max", pids)
        if "cpu" in self.paths:
            cpu = self.paths["cpu"]
            _write(cpu / "cpu.cfs_period_us", CPU_PERIOD_US)
            _write(cpu / "cpu.cfs_quota_us", quota)

    def counters(self) -> Counters:
        """The OOM kills and refused forks so far (0 for a controller not in use)."""
        oom = refused = 0
        if "memory" in self.paths:
            name = "memory.events" if self.version == 2 else "memory.oom_control"
            oom = _keyed(self.paths["memory"] / name).get("oom_kill", 0)
        if "pids" in self.paths:
            refused = _keyed(self.paths["pids"] / "pids.events").get("max", 0)
        return Counters(oom_kills=oom, pids_refused=refused)

    def pids(self) -> list[int]:
        """The processes in the slot's cgroup now (pids of this process's namespace)."""
        found: set[int] = set()
        for procs in self.procs_files:
            with contextlib.suppress(FileNotFoundError):
                found.update(int(line) for line in Path(procs).read_text().split())
        return sorted(found)

    def kill(self, spare: Collection[int] = ()) -> bool:
        """SIGKILL whatever is in the cgroup but `spare` (the slot's zygote) until nothing
        else is left; False if that will not happen.

        (v1 has no cgroup.kill: a fork between reading and killing is caught by the next
        round, and the pids limit bounds how many can appear.)"""
        give_up = time.monotonic() + KILL_WAIT_SECONDS
        while pids := [pid for pid in self.pids() if pid not in spare]:
            if time.monotonic() > give_up:
                return False
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.001)
        return True

    def remove(self) -> None:
        """Kill what is left and remove the slot's directories (best effort)."""
        self.kill()
        for path in set(self.paths.values()):
            with contextlib.suppress(OSError):
                path.rmdir()


def find(
    mountinfo: str | None = None,
    self_cgroup: str | None = None,
    root: Path = Path("/"),
    *,
    mount_private: bool = True,
) -> Found:
    """Where this process can make slot cgroups: v2 if it offers every controller, else
    v1 controller by controller. A hierarchy mounted read-only (as in a container) is
    mounted again, writable, under PRIVATE when `mount_private`. (`mountinfo`,
    `self_cgroup` and `root` let tests describe another machine.)"""
    if mountinfo is None:
        mountinfo = (root / "proc/self/mountinfo").read_text()
    if self_cgroup is None:
        self_cgroup = (root / "proc/self/cgroup").read_text()
    v1, v2 = _mounts(mountinfo, root)
    v2_problem = "no cgroup2 filesystem is mounted"
    if v2 is not None:
        own = _own_path(self_cgroup, "")
        base = v2 / own.lstrip("/")
        try:
            available = set((base / "cgroup.controllers").read_text().split())
        except OSError as error:
            available = set()
            v2_problem = f"cannot read {base / 'cgroup.controllers'}: {error.strerror}"
        else:
            absent = [name for name in CONTROLLERS if name not in available]
            private: Path | None = base
            if not absent and not os.access(base, os.W_OK) and mount_private:
                # A container's cgroupfs is mounted read-only; a cgroup2 mounted by us in
                # our own mount namespace is writable (and, in a container's own cgroup
                # namespace, rooted at the container's cgroup).
                private, v2_problem = _mount_private(PRIVATE_V2, "cgroup2", "")
                if private is not None:
                    private = private / own.lstrip("/")
            if absent:
                v2_problem = (
                    f"cgroup v2 at {base} does not offer {', '.join(absent)} (bound to v1, or "
                    "not delegated to this worker)"
                )
            elif private is not None:
                return Found(2, dict.fromkeys(CONTROLLERS, private / GROUP), {})
    bases: dict[str, Path] = {}
    missing: dict[str, str] = {}
    for name in CONTROLLERS:
        if name not in v1:
            missing[name] = f"no v1 hierarchy has it, and {v2_problem}"
            continue
        mount, options = v1[name]
        if not os.access(mount, os.W_OK) and mount_private:
            # The hierarchy is named by all its controllers: a mount naming fewer (`cpu`
            # where the host has `cpu,cpuacct`) is refused with EBUSY.
            private, problem = _mount_private(PRIVATE / f"cgroup-{options}", "cgroup", options)
            if private is None:
                missing[name] = f"{mount} is read-only, and {problem}"
                continue
            mount = private
        if not os.access(mount, os.W_OK):
            missing[name] = f"{mount} is not writable (the worker needs root there)"
        else:
            bases[name] = mount / GROUP
    return Found(1 if bases else 0, bases, missing)


def create(found: Found, name: str, *, fresh: bool = True) -> SlotCgroup:
    """The slot cgroup `name` (made if missing; emptied of leftovers when `fresh`)."""
    if found.version == 2:
        base = next(iter(found.bases.values()))
        _delegate_v2(base.parent, base)
        path = base / name
        _mkdir(path)
        cgroup = SlotCgroup(2, dict.fromkeys(found.bases, path))
    else:
        paths = {controller: base / name for controller, base in found.bases.items()}
        for path in paths.values():
            _mkdir(path)
        cgroup = SlotCgroup(1, paths)
    if fresh and not cgroup.kill():
        raise CgroupError(f"cannot empty the cgroup {name}: processes keep appearing")
    return cgroup


def _delegate_v2(own: Path, group: Path) -> None:
    """Enable memory, pids and cpu for `group` (under the worker's own cgroup `own`) and
    for its children. A v2 cgroup with processes cannot hand controllers to children (the
    "no internal processes" rule): the worker's own processes move to a leaf first."""
    wanted = " ".join(f"+{name}" for name in CONTROLLERS)
    try:
        _write(own / "cgroup.subtree_control", wanted)
    except CgroupError as error:
        if not isinstance(error.__cause__, OSError) or error.__cause__.errno != errno.EBUSY:
            raise
        leaf = own / V2_LEAF
        _mkdir(leaf)
        for pid in (own / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError, OSError):
                (leaf / "cgroup.procs").write_text(pid)
        _write(own / "cgroup.subtree_control", wanted)
    _mkdir(group)
    _write(group / "cgroup.subtree_control", wanted)


def _mount_private(point: Path, fstype: str, options: str) -> tuple[Path | None, str]:
    """Mount a cgroup hierarchy (`cgroup2`, or v1 `cgroup` with its controllers as
    `options`) at `point`, kept if already there; the mount point, or why not."""
    if os.path.ismount(point):
        return point, ""
    argv = ["mount", "-t", fstype, *(["-o", options] if options else []), fstype, str(point)]
    try:
        point.mkdir(parents=True, exist_ok=True)
        subprocess.run(argv, check=True, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as error:
        output = (getattr(error, "stderr", "") or str(error)).strip()
        return None, (
            f"mounting it writable at {point} (`{' '.join(argv)}`) failed: {output} "
            "(the worker needs CAP_SYS_ADMIN for that, as docker-compose.yml gives it)"
        )
    return point, ""


def _mounts(mountinfo: str, root: Path) -> tuple[dict[str, tuple[Path, str]], Path | None]:
    """The v1 hierarchy of each controller (its mount point, and the controllers it
    binds, as mount options: `cpu,cpuacct`), and the cgroup2 mount, from mountinfo."""
    v1: dict[str, tuple[Path, str]] = {}
    v2: Path | None = None
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        after = line.split(" - ", 1)[1].split()
        fstype, options = after[0], (after[2] if len(after) > 2 else "")
        point = root / fields[4].lstrip("/")
        if fstype == "cgroup2" and v2 is None:
            v2 = point
        elif fstype == "cgroup":
            bound = [option for option in options.split(",") if option in KERNEL_CONTROLLERS]
            for option in bound:
                if option in CONTROLLERS and option not in v1:
                    v1[option] = (point, ",".join(bound))
    return v1, v2


def _own_path(self_cgroup: str, controllers: str) -> str:
    """This process's cgroup path in the hierarchy of `controllers` ("" = v2)."""
    for line in self_cgroup.splitlines():
        _, names, path = line.split(":", 2)
        if names == controllers:
            return path
    return "/"


def _keyed(path: Path) -> dict[str, int]:
    """A flat-keyed cgroup file (`name value` per line) as numbers."""
    values: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                values[name] = int(value)
    return values


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CgroupError(f"cannot create {path}: {error.strerror or error}") from error


def _write(path: Path, value: object) -> None:
    try:
        path.write_text(str(value))
    except OSError as error:
        raise CgroupError(f"cannot write {value} to {path}: {error.strerror or error}") from error


def _write_if_present(path: Path, value: object) -> None:
    if path.exists():
        _write(path, value)


def describe(found: Found, controllers: Iterable[str] = CONTROLLERS) -> dict[str, str]:
    """A line per controller for the layer table: where, or why not."""
    lines = {}
    for name in controllers:
        if name in found.bases:
            lines[name] = f"cgroup v{found.version}: {found.bases[name]}/<slot user>"
        else:
            lines[name] = found.missing.get(name, "not found")
    return lines
