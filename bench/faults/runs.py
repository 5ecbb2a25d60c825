"""Counting program runs from inside the programs, through the sandbox.

A sandboxed run reaches no host file, no host socket and no network (docs/sandbox.md):
its side effects die with it. One thing it does share with its slot is the slot's
network namespace, kept by the slot's zygote for all of the slot's runs; it is empty (not
even loopback) but, like any network namespace, has its own abstract Unix socket names.
So the suite, as root, enters each slot's namespace (the zygote holds it as an open
descriptor, `/proc/<zygote>/fd/N -> net:[inode]`) from a thread, binds a datagram socket
to the abstract name ``taskledger-faults-runs`` there, and leaves; the socket stays in
that namespace. Every program of the load starts with `PRELUDE`, which sends one
datagram with its task's token and the time to that name. The suite receives it on the
socket of the slot that ran it, and so knows which worker ran it and when.

The isolation is unchanged: programs get no address outside their slot's namespace; the
suite put a listener inside it. A zygote that is replaced (it died) has a new namespace;
the suite looks for new ones every `RESCAN` seconds, and a program whose datagram finds
no listener yet tries again for up to 10 s.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson
import psutil

ADDRESS = b"\0taskledger-faults-runs"
CLONE_NEWNET = 0x40000000
RESCAN = 0.2  # seconds between looks for new slots

# Standard library only (the sandbox runs `python3 -I -S`); `data` is the task's input.
PRELUDE = f"""import json as _json, socket as _socket, time as _time
def _report_run():
    _message = _json.dumps({{"token": data["token"], "at": _time.time()}}).encode()
    _sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
    for _ in range(200):
        try:
            _sock.sendto(_message, {ADDRESS!r})
            break
        except OSError:
            _time.sleep(0.05)
    _sock.close()
_report_run()
"""


@dataclass(frozen=True)
class Run:
    """One program run, as the program reported it."""

    token: str  # the task's, from its data
    at: float  # the program's time.time() when it started
    worker: str  # the label of the worker whose slot ran it
    received: float  # time.time() when the suite got the datagram


def _bound_in(namespace: str) -> socket.socket:
    """A datagram socket bound to ADDRESS inside the network namespace at `namespace`
    (a /proc path); made in a thread of its own, which alone enters the namespace."""
    made: list[socket.socket] = []
    failed: list[BaseException] = []

    def enter() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            fd = os.open(namespace, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"setns({namespace}): {os.strerror(errno)}")
            finally:
                os.close(fd)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(ADDRESS)
            sock.setblocking(False)
            made.append(sock)
        except BaseException as error:  # noqa: BLE001 - handed to the caller
            failed.append(error)

    thread = threading.Thread(target=enter, name="faults-setns")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return made[0]


def _slot_namespaces(zygote: psutil.Process) -> dict[int, str]:
    """inode -> /proc path of the network namespaces a zygote holds open."""
    found: dict[int, str] = {}
    base = f"/proc/{zygote.pid}/fd"
    with contextlib.suppress(OSError):
        for name in os.listdir(base):
            path = f"{base}/{name}"
            with contextlib.suppress(OSError):
                target = os.readlink(path)
                if target.startswith("net:["):
                    found[int(target[5:-1])] = path
    return found


class RunCounter:
    """Receives the programs' datagrams in every slot of the given workers."""

    def __init__(self, workers: Callable[[], dict[int, str]]) -> None:
        self._workers = workers  # pid -> label, of the workers running now
        self._selector = selectors.DefaultSelector()
        self._sockets: dict[int, socket.socket] = {}  # namespace inode -> its socket
        self._lock = threading.Lock()
        self._runs: list[Run] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="faults-runs", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        for sock in self._sockets.values():
            sock.close()
        self._selector.close()

    def slots(self, label: str) -> int:
        """How many slots of worker `label` have a listener."""
        with self._lock:
            return sum(1 for s in self._selector.get_map().values() if s.data == label)

    def runs(self) -> list[Run]:
        with self._lock:
            return list(self._runs)

    def _scan(self) -> None:
        for pid, label in self._workers().items():
            try:
                zygotes = [
                    p
                    for p in psutil.Process(pid).children(recursive=True)
                    if p.name() == "tl-zygote"
                ]
            except psutil.Error:
                continue
            for zygote in zygotes:
                for inode, path in _slot_namespaces(zygote).items():
                    if inode in self._sockets:
                        continue
                    try:
                        sock = _bound_in(path)
                    except OSError as error:
                        self.errors.append(f"slot namespace {path}: {error}")
                        continue
                    self._sockets[inode] = sock
                    with self._lock:
                        self._selector.register(sock, selectors.EVENT_READ, label)

    def _loop(self) -> None:
        scanned = 0.0
        while not self._stop.is_set():
            if time.monotonic() - scanned >= RESCAN:
                self._scan()
                scanned = time.monotonic()
            if not self._sockets:
                self._stop.wait(RESCAN)
                continue
            for key, _ in self._selector.select(RESCAN):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                while True:
                    try:
                        message = sock.recv(4096)
                    except BlockingIOError:
                        break
                    except OSError as error:
                        self.errors.append(f"receiving: {error}")
                        break
                    try:
                        body = orjson.loads(message)
                        run = Run(str(body["token"]), float(body["at"]), key.data, time.time())
                    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                        self.errors.append(f"a datagram that is not a run: {message[:100]!r}")
                        continue
                    with self._lock:
                        self._runs.append(run)
