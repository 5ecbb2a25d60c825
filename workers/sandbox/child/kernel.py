"""The system calls the zygote makes through libc (standard library only: ctypes), and
their constants. Every failure is an OSError naming the call."""

from __future__ import annotations

import ctypes
import os

# Namespace flags (clone/unshare/setns).
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
# mount(2) flags.
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2
# The new mount API (the same numbers on every architecture).
SYS_MOVE_MOUNT = 429
SYS_FSOPEN = 430
SYS_FSCONFIG = 431
SYS_FSMOUNT = 432
FSOPEN_CLOEXEC = 0x1
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
FSMOUNT_CLOEXEC = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOVE_MOUNT_F_EMPTY_PATH = 0x4
AT_FDCWD = -100
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
# prctl(2).
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NAME = 15
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38


class Kernel:
    def __init__(self) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.mount.argtypes = [
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_ulong,
            ctypes.c_char_p,
        ]
        self.libc.syscall.restype = ctypes.c_long

    def check(self, result: int, what: str) -> int:
        if result < 0:
            error = ctypes.get_errno()
            raise OSError(error, f"{what}: {os.strerror(error)}")
        return result

    def prctl(self, option: int, value: int) -> None:
        self.check(self.libc.prctl(option, value, 0, 0, 0), f"prctl({option})")

    def mount(
        self, source: str | None, target: str, fstype: str | None, flags: int, data: str = ""
    ) -> None:
        self.check(
            self.libc.mount(
                source.encode() if source else None,
                target.encode(),
                fstype.encode() if fstype else None,
                flags,
                data.encode() if data else None,
            ),
            f"mount {source or fstype} on {target}",
        )

    def umount(self, target: str) -> None:
        self.check(self.libc.umount2(target.encode(), MNT_DETACH), f"umount {target}")

    def setns(self, fd: int, kind: int, what: str) -> None:
        self.check(self.libc.setns(fd, kind), f"setns({what})")

    def tmpfs(self, options: str) -> int:
        """A new, detached tmpfs (a descriptor that move_mount attaches)."""
        syscall = self.libc.syscall
        fs = self.check(syscall(SYS_FSOPEN, b"tmpfs", FSOPEN_CLOEXEC), "fsopen(tmpfs)")
        try:
            for option in options.split(","):
                key, _, value = option.partition("=")
                self.check(
                    syscall(SYS_FSCONFIG, fs, FSCONFIG_SET_STRING, key.encode(), value.encode(), 0),
                    f"fsconfig {option}",
                )
            self.check(syscall(SYS_FSCONFIG, fs, FSCONFIG_CMD_CREATE, None, None, 0), "fsconfig")
            flags = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
            return self.check(syscall(SYS_FSMOUNT, fs, FSMOUNT_CLOEXEC, flags), "fsmount")
        finally:
            os.close(fs)

    def seccomp_program(self, bpf: bytes) -> object:
        """A compiled seccomp filter, ready for `seccomp` (made once: ctypes is slow)."""

        class Program(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

        code = ctypes.create_string_buffer(bpf, len(bpf))
        program = Program(len(bpf) // 8, ctypes.addressof(code))
        program._code = code  # kept alive with the program
        return ctypes.byref(program)

    def seccomp(self, program: object) -> None:
        """Load a filter from `seccomp_program` (no_new_privs must be set)."""
        result = self.libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, program, 0, 0)
        self.check(result, "seccomp")

    def unshare(self, flags: int, what: str) -> None:
        self.check(self.libc.unshare(flags), f"unshare({what})")

    def move_mount(self, fd: int, target: str) -> None:
        """Attach a detached mount (from `tmpfs`) at `target`."""
        self.check(
            self.libc.syscall(
                SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, target.encode(), MOVE_MOUNT_F_EMPTY_PATH
            ),
            f"move_mount {target}",
        )

    def pivot_root(self, new_root: str) -> None:
        """Make `new_root` (a mount point) the root, and detach the old one."""
        machine = os.uname().machine
        number = SYS_PIVOT_ROOT.get(machine)
        if number is None:
            raise OSError(f"no pivot_root system call number known for {machine}")
        os.chdir(new_root)
        self.check(self.libc.syscall(number, b".", b"."), "pivot_root")
        self.umount(".")  # the old root, now stacked under the new one
        os.chdir("/")

    def sethostname(self, name: bytes) -> None:
        self.check(self.libc.sethostname(name, len(name)), "sethostname")

    def set_name(self, name: bytes) -> None:
        """The process's name (`comm`: what `ps -e` and `pgrep` show)."""
        self.libc.prctl(PR_SET_NAME, name, 0, 0, 0)
