"""The seccomp filter every sandboxed process runs under, built with libseccomp.

Default: allow. Denied with EPERM (an ordinary error the program can handle): what
untrusted code never needs and what widens the kernel's attack surface — new namespaces,
io_uring, BPF, the kernel keyring, mounting, tracing other processes, performance
counters, kernel modules, userfaultfd, handles to files by number, and the machine's clock,
swap and reboot. `clone3` answers ENOSYS instead, as container runtimes do: its flags sit
in memory a filter cannot read, and C libraries fall back to `clone` on ENOSYS, whose
namespace flags the filter does see. System calls of another ABI (32-bit calls from a
64-bit process) kill the process: the filter covers the native one.

The filter is built once by the worker (pyseccomp over the system's libseccomp) and
handed to the zygote as compiled BPF, which each run's child loads just before the
program starts.
"""

from __future__ import annotations

import errno
import tempfile
from dataclasses import dataclass

# CLONE_NEW* flags: a clone() with any of them set is refused.
NAMESPACE_FLAGS = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}

DENIED = (
    # namespaces
    "unshare",
    "setns",
    # io_uring
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    # BPF and the kernel keyring
    "bpf",
    "keyctl",
    "add_key",
    "request_key",
    # mounting, old and new API, and changing root
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    # other processes' memory
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "perf_event_open",
    # the kernel itself
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "userfaultfd",
    "open_by_handle_at",
    "name_to_handle_at",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "syslog",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "iopl",
    "ioperm",
    "vhangup",
)


class SeccompUnavailable(Exception):
    """libseccomp (or its Python binding) is not there: the message says what to install."""


@dataclass(frozen=True)
class Filter:
    bpf: bytes  # the compiled program (struct sock_filter[]), native byte order
    denied: tuple[str, ...]  # the system calls refused with EPERM
    unknown: tuple[str, ...]  # denied names this libseccomp does not know (older kernels)


def build() -> Filter:
    """Compile the filter for this machine's architecture."""
    try:
        import pyseccomp as seccomp
    except (ImportError, OSError) as error:
        raise SeccompUnavailable(
            f"cannot load libseccomp ({error}): install the libseccomp2 package and the "
            "pyseccomp Python package"
        ) from None
    rules = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    rules.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.KILL_PROCESS)
    eperm = seccomp.ERRNO(errno.EPERM)
    denied: list[str] = []
    unknown: list[str] = []
    for name in DENIED:
        try:
            rules.add_rule(eperm, name)
        except OSError:  # a name this libseccomp (or architecture) does not have
            unknown.append(name)
        else:
            denied.append(name)
    for flag in NAMESPACE_FLAGS.values():
        rules.add_rule(eperm, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    try:
        rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    except OSError:
        unknown.append("clone3")
    with tempfile.TemporaryFile() as compiled:
        rules.export_bpf(compiled)
        compiled.seek(0)
        bpf = compiled.read()
    return Filter(bpf=bpf, denied=tuple(denied), unknown=tuple(unknown))
