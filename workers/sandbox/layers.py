"""The sandbox's layers of isolation: which are active on this worker, and why not.

`taskledger worker --check-sandbox` prints them as a table; the worker logs them at start
and refuses untrusted code while one is missing, unless the operator opted in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

SLOT_USERS = "slot users"
MOUNT_NS = "mount namespace"
PID_NS = "pid namespace"
IPC_NS = "ipc namespace"
NETWORK_NS = "network namespace"
CGROUP_MEMORY = "cgroup memory"
CGROUP_PIDS = "cgroup pids"
CGROUP_CPU = "cgroup cpu"
SECCOMP = "seccomp"

ORDER = (
    SLOT_USERS,
    MOUNT_NS,
    PID_NS,
    IPC_NS,
    NETWORK_NS,
    CGROUP_MEMORY,
    CGROUP_PIDS,
    CGROUP_CPU,
    SECCOMP,
)
NAMESPACES = (MOUNT_NS, PID_NS, IPC_NS, NETWORK_NS)
CGROUP_LAYERS = {"memory": CGROUP_MEMORY, "pids": CGROUP_PIDS, "cpu": CGROUP_CPU}


@dataclass(frozen=True)
class Layer:
    name: str
    active: bool
    detail: str  # what it does here, or why it is missing


def missing(layers: Iterable[Layer]) -> list[Layer]:
    return [layer for layer in layers if not layer.active]


def table(layers: Iterable[Layer]) -> str:
    """The layers as a plain-text table, one per line."""
    rows = [("layer", "state", "detail")] + [
        (layer.name, "active" if layer.active else "MISSING", layer.detail) for layer in layers
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(2)]
    return "\n".join(
        f"{name:<{widths[0]}}  {state:<{widths[1]}}  {detail}" for name, state, detail in rows
    )


def refusal(layers: Iterable[Layer]) -> str:
    """Why this worker refuses untrusted code: the missing layers, and what to do."""
    names = "; ".join(f"{layer.name} ({layer.detail})" for layer in missing(layers))
    return (
        f"this worker cannot isolate programs: missing {names}. Fix the machine (see "
        "`taskledger worker --check-sandbox` and docs/sandbox.md), or run untrusted code "
        "without these layers by setting [sandbox] allow_unisolated = true "
        "(TASKLEDGER_SANDBOX__ALLOW_UNISOLATED=true)"
    )
