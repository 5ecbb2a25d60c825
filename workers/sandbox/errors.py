"""The sandbox's errors."""

from __future__ import annotations


class SandboxError(Exception):
    """The sandbox could not run a program (the message says why): the program may be
    fine, so its attempt may be retried."""


class SandboxUnavailable(SandboxError):
    """This worker lacks an isolation layer and the operator has not opted in to running
    untrusted code without it (`[sandbox] allow_unisolated`). The message names the
    missing layers; retrying on this worker cannot help."""
