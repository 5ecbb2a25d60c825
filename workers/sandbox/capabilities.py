"""What the sandbox found at start (its `Capabilities`: the layers, how it runs programs,
why it refuses them), and the one log line that says so."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from workers.sandbox import layers
from workers.sandbox.layers import Layer
from workers.sandbox.limits import Limits
from workers.sandbox.users import SlotUser

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Capabilities:
    """What the sandbox found at `start`, and how it runs programs."""

    root: bool
    users: tuple[SlotUser, ...]  # one per slot when root, else empty
    layers: tuple[Layer, ...]
    python: str  # the interpreter Python programs run on
    isolated: bool  # runs are forked by the zygote into their namespaces (else spawned)
    refusal: str | None  # why programs are refused (a layer missing, no opt-in)

    @property
    def missing(self) -> list[Layer]:
        return layers.missing(self.layers)

    def active(self, name: str) -> bool:
        return any(layer.name == name and layer.active for layer in self.layers)


def with_layer(found: tuple[Layer, ...], name: str, active: bool, detail: str) -> tuple[Layer, ...]:
    return tuple(Layer(name, active, detail) if layer.name == name else layer for layer in found)


def log_capabilities(caps: Capabilities, limits: Limits, work_dir: Path) -> None:
    """Log once what the sandbox found: every layer active, or what is missing."""
    how = (
        "every run is forked by a warm zygote into its own namespaces"
        if caps.isolated
        else "programs are SPAWNED WITHOUT ISOLATION (util-linux wrappers)"
    )
    state = ", ".join(f"{layer.name}: {'on' if layer.active else 'OFF'}" for layer in caps.layers)
    extra = {
        "layers": {layer.name: layer.active for layer in caps.layers},
        "isolated": caps.isolated,
        "python": caps.python,
        "slot_users": [u.name for u in caps.users],
        "memory_bytes": limits.memory_bytes,
        "processes": limits.processes,
        "cpus": limits.cpus,
        "tmp_bytes": limits.tmp_bytes,
        "work_dir": str(work_dir),
    }
    if caps.refusal is not None:
        log.error(
            "sandbox: REFUSING python and csharp tasks: %s. Layers: %s",
            caps.refusal,
            state,
            extra=extra,
        )
    elif caps.missing:
        log.warning(
            "sandbox: RUNNING UNTRUSTED CODE WITHOUT %s (allowed by [sandbox] "
            "allow_unisolated): %s; python on %s",
            ", ".join(layer.name for layer in caps.missing),
            how,
            caps.python,
            extra=extra,
        )
    else:
        log.info(
            "sandbox ready: every layer is active (%s); %s; python on %s",
            state,
            how,
            caps.python,
            extra=extra,
        )
