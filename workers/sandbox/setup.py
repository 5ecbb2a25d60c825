"""What the sandbox does once, at start: check each layer, make the slots' cgroups and
seccomp filter, choose the interpreter, sweep what a killed worker left; and what a
slot's zygote is to prepare."""

from __future__ import annotations

import base64
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from workers.sandbox import cgroups, layers
from workers.sandbox import seccomp as seccomp_filter
from workers.sandbox.cgroups import CgroupError, SlotCgroup
from workers.sandbox.errors import SandboxError
from workers.sandbox.layers import Layer
from workers.sandbox.limits import Limits, MiB
from workers.sandbox.spawn import Spawner
from workers.sandbox.users import CLEAN_PATH, SlotUser, run_quietly

TASK_DIR = "/task"  # where an isolated run sees its directory
# What the languages need in a slot's root besides /usr (bound read-only where present).
ROOT_PATHS = ("/etc/ld.so.cache", "/etc/localtime", "/etc/mono", "/etc/alternatives")
NAMESPACE_FLAGS = {
    layers.MOUNT_NS: "--mount",
    layers.PID_NS: "--pid",
    layers.IPC_NS: "--ipc",
    layers.NETWORK_NS: "--net",
}


async def find_layers(
    spawner: Spawner,
    root: bool,
    users: Sequence[SlotUser],
    isolate: bool,
    limits: Limits,
    network_problem: str,
) -> tuple[dict[str, Layer], dict[int, SlotCgroup], bytes | None]:
    """Each layer, by name, as found here; isolated (root and `isolate`), also the slots'
    cgroups (by slot number) and the compiled seccomp filter, made ready. `network_problem`:
    why the spawner cannot make network namespaces ("" if it can)."""
    found: dict[str, Layer] = {}
    found[layers.SLOT_USERS] = Layer(
        layers.SLOT_USERS,
        root,
        f"{', '.join(u.name for u in users)}: one unprivileged user per slot"
        if root
        else f"not root (uid {os.geteuid()}): programs would run as this same user",
    )
    made: dict[int, SlotCgroup] = {}
    seccomp: bytes | None = None
    if root and isolate:
        found.update(await probe_namespaces(spawner.tools["unshare"], limits))
        made, cgroup_layers = make_cgroups(users, limits)
        found.update(cgroup_layers)
        seccomp, found[layers.SECCOMP] = build_seccomp()
    else:
        why = "needs the isolated sandbox (root)" if isolate else "isolation is off"
        for name in (*layers.NAMESPACES, *layers.CGROUP_LAYERS.values(), layers.SECCOMP):
            found[name] = Layer(name, False, why)
        found[layers.NETWORK_NS] = Layer(
            layers.NETWORK_NS,
            spawner.network,
            "a new one per run (spawned)" if spawner.network else network_problem,
        )
    return found, made, seccomp


async def probe_namespaces(unshare: str, limits: Limits) -> dict[str, Layer]:
    """Each namespace the isolated sandbox needs, tried with util-linux's unshare."""
    mounts = (
        "a read-only root of what the languages need; fresh tmpfs /tmp, /var/tmp, "
        f"/dev/shm ({limits.tmp_bytes // MiB} MiB, {limits.tmp_files} files each); "  # noqa: S108
        f"{TASK_DIR}: the run's directory"
    )
    details = {
        layers.MOUNT_NS: mounts,
        layers.PID_NS: "a run sees only its own processes; they all end with it",
        layers.IPC_NS: "SysV IPC and POSIX message queues of its own per run",
        layers.NETWORK_NS: "an empty network namespace per slot: no interface",
    }
    found = {}
    for name, flag in NAMESPACE_FLAGS.items():
        argv = [unshare, flag, *(["--fork"] if flag == "--pid" else []), "--", "true"]
        code, output = await run_quietly(argv)
        detail = details[name]
        if code != 0:
            detail = f"`unshare {flag}` failed here: {output.strip() or code}"
        found[name] = Layer(name, code == 0, detail)
    return found


def make_cgroups(
    users: Sequence[SlotUser], limits: Limits
) -> tuple[dict[int, SlotCgroup], dict[str, Layer]]:
    """One configured cgroup per slot (by slot number), and the three cgroup layers."""
    found = cgroups.find()
    problems: dict[str, str] = dict(found.missing)
    made: dict[int, SlotCgroup] = {}
    if found.bases:
        try:
            for slot, user in enumerate(users):
                cgroup = cgroups.create(found, user.name)
                cgroup.configure(limits.memory_bytes, limits.processes, limits.cpus)
                made[slot] = cgroup
        except CgroupError as error:
            for cgroup in made.values():
                cgroup.remove()
            made = {}
            problems = {name: str(error) for name in cgroups.CONTROLLERS}
    described = cgroups.describe(found)
    bounds = {
        "memory": f"{limits.memory_bytes // MiB} MiB",
        "pids": f"{limits.processes} processes",
        "cpu": f"{limits.cpus:g} CPU",
    }
    found_layers = {
        layer: Layer(
            layer,
            controller not in problems,
            problems.get(controller, f"{bounds[controller]} per slot; {described[controller]}"),
        )
        for controller, layer in layers.CGROUP_LAYERS.items()
    }
    return made, found_layers


def build_seccomp() -> tuple[bytes | None, Layer]:
    """The compiled filter, and its layer."""
    try:
        built = seccomp_filter.build()
    except (seccomp_filter.SeccompUnavailable, OSError) as error:
        return None, Layer(layers.SECCOMP, False, str(error))
    detail = f"{len(built.denied)} system calls refused with EPERM, clone3 with ENOSYS"
    if built.unknown:
        detail += f" (unknown here: {', '.join(built.unknown)})"
    return built.bpf, Layer(layers.SECCOMP, True, detail)


def sweep(work_dir: Path, users: Sequence[SlotUser]) -> None:
    """Remove what runs of a worker that was killed left in the work directory: its run
    directories (an isolated slot's tmpfs is then mounted anew by the zygote), and those
    of the layout before it (`slotN-*`, owned by our slot users)."""
    uids = {user.uid for user in users}
    for entry in os.scandir(work_dir):
        try:
            owner = entry.stat(follow_symlinks=False).st_uid
        except OSError:
            continue
        stale = entry.name.startswith("slot") and owner in uids
        if stale or dead_worker_dir(entry.name):
            shutil.rmtree(entry.path, ignore_errors=True)
    for user in users:
        runs = work_dir / user.name
        if runs.is_dir():
            for entry in os.scandir(runs):
                shutil.rmtree(entry.path, ignore_errors=True)


def dead_worker_dir(name: str) -> bool:
    """`uid<U>-pid<P>`: the run directories of an unprivileged worker; stale once P is
    gone."""
    if not name.startswith(f"uid{os.getuid()}-pid"):
        return False
    try:
        pid = int(name.rsplit("pid", 1)[1])
    except ValueError:
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _interpreters(ours_first: bool) -> list[str]:
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system = [
        os.path.realpath(found)
        for name in (version, "python3")
        if (found := shutil.which(name, path=CLEAN_PATH))
    ]
    ours = [os.path.realpath(sys.executable)]
    return list(dict.fromkeys(ours + system if ours_first else system + ours))


async def choose_isolated_python() -> tuple[str, list[str]]:
    """The interpreter for programs and the zygote, and what a slot's root must bind for
    it and the other languages: the system's of the worker's version first (it lives in
    /usr), else the worker's own (its prefix is bound read-only into the root)."""
    problems = []
    for python in _interpreters(ours_first=False):
        probe = [python, "-I", "-S", "-c", "import sys;print(sys.base_prefix)"]
        code, output = await run_quietly(probe)
        if code != 0:
            problems.append(f"{python}: {output.strip()}")
            continue
        prefix = output.split()[0]
        binds = [] if prefix.startswith("/usr") else [prefix]
        return python, [*binds, *ROOT_PATHS]
    raise SandboxError("no Python interpreter for the sandbox: " + "; ".join(problems))


async def choose_spawned_python(spawner: Spawner, limits: Limits, user: SlotUser | None) -> str:
    """The interpreter for spawned programs: ours, if the slot user can run it (it may
    live under a home directory it cannot enter), else the system's."""
    problems = []
    for python in _interpreters(ours_first=True):
        probe = [python, "-I", "-S", "-c", "print(1)"]
        code, output = await run_quietly(spawner.wrap(probe, limits, user))
        if code == 0:
            return python
        problems.append(f"{python}: {output.strip() or code}")
    raise SandboxError("no Python interpreter runs in the sandbox: " + "; ".join(problems))


def etc_files(user: SlotUser) -> dict[str, str]:
    """/etc of a slot's root: who is who, and localhost."""
    return {
        "passwd": (
            "root:x:0:0:root:/root:/usr/sbin/nologin\n"
            f"sandbox:x:{user.uid}:{user.gid}:taskledger sandbox:{TASK_DIR}:/usr/sbin/nologin\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        ),
        "group": f"root:x:0:\nsandbox:x:{user.gid}:\nnogroup:x:65534:\n",
        "hosts": "127.0.0.1 localhost sandbox\n::1 localhost ip6-localhost\n",
        "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\n",
        "hostname": "sandbox\n",
    }


def slot_request(
    slot: int,
    user: SlotUser,
    work_dir: Path,
    limits: Limits,
    cgroup: SlotCgroup | None,
    binds: list[str],
    seccomp: bytes | None,
) -> dict[str, object]:
    """What the slot's zygote is to prepare (`child/slots.py`)."""
    return {
        "slot": slot,
        "uid": user.uid,
        "gid": user.gid,
        "runs_dir": str(work_dir / user.name),
        "stage_dir": str(work_dir / f".root-{user.name}"),
        "tmp_bytes": limits.tmp_bytes,
        "tmp_files": limits.tmp_files,
        "binds": binds,
        "etc": etc_files(user),
        "cgroup_procs": cgroup.procs_files if cgroup else [],
        "seccomp": base64.b64encode(seccomp).decode() if seccomp else None,
    }
