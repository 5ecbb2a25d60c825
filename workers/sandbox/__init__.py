"""The sandbox untrusted programs run in (docs/sandbox.md).

- `sandbox.py`: the `Sandbox` a worker runs programs in, slot by slot;
- `programs.py`: what it runs (a `Program`: `Argv` or `PythonSource`), where (a
  `Workspace`) and how that ended (`Ended`); `processes.py`: a run in progress;
- `setup.py`: what it does once at start; `capabilities.py`: what it found then;
- `limits.py`: what a run may use; `layers.py`: the layers of isolation and their check;
- `cgroups.py`, `seccomp.py`, `users.py`: the layers' own parts;
- `zygote.py`: the worker's side of one zygote (`ZygoteClient`); `zygotes.py`: the slots'
  zygotes, one per slot; `child/`: what runs on the sandbox's interpreter (the zygote's
  `ZygoteServer` and the Python bootstrap), standard library only;
- `spawn.py`: the unisolated way to start a program, where isolation is not possible;
- `capture.py`: reading a program's output up to a cap.
"""

from workers.sandbox.capabilities import Capabilities
from workers.sandbox.errors import SandboxError, SandboxUnavailable
from workers.sandbox.layers import Layer
from workers.sandbox.limits import LimitKind, Limits, MiB
from workers.sandbox.programs import (
    Argv,
    Ended,
    Program,
    PythonSource,
    Workspace,
    loop_deadline,
)
from workers.sandbox.sandbox import Sandbox
from workers.sandbox.users import CLEAN_PATH, SlotUser, uid_processes

__all__ = [
    "CLEAN_PATH",
    "Argv",
    "Capabilities",
    "Ended",
    "Layer",
    "LimitKind",
    "Limits",
    "MiB",
    "Program",
    "PythonSource",
    "Sandbox",
    "SandboxError",
    "SandboxUnavailable",
    "SlotUser",
    "Workspace",
    "loop_deadline",
    "uid_processes",
]
