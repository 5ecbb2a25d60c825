"""Counting program runs from inside the sandbox (docs/reliability.md, "How runs are
counted from inside the program"): the suite, as root, binds a datagram socket to an
abstract name inside each slot's network namespace (held open by the slot's zygote); every
program of the load starts with `PRELUDE`, which reports its task's token, a run id and
the time there when it starts and every `ALIVE_EVERY` seconds while it runs. Replaced
zygotes are looked for every `RESCAN` seconds; a program finding no listener yet tries
again for up to 10 s."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
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

ALIVE_EVERY = 0.5  # seconds between a running program's "alive" datagrams

# Standard library only (the sandbox runs `python3 -I -S`); `data` is the task's input.
# One "start" datagram (tried again for up to 10 s while no listener is bound yet), then
# "alive" every ALIVE_EVERY seconds from a daemon thread until the run ends or is killed.
PRELUDE = f"""import json as _json, os as _os, socket as _socket, threading as _threading
import time as _time
_run = {{"token": data["token"], "run": _os.urandom(8).hex(), "at": _time.time()}}
_sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
def _say(kind):
    try:
        _sock.sendto(_json.dumps(dict(_run, kind=kind, now=_time.time())).encode(), {ADDRESS!r})
        return True
    except OSError:
        return False
for _ in range(200):
    if _say("start"):
        break
    _time.sleep(0.05)
def _alive():
    while True:
        _time.sleep({ALIVE_EVERY})
        _say("alive")
_threading.Thread(target=_alive, daemon=True).start()
"""


@dataclass
class Run:
    """One program run, as the program reported it."""

    token: str  # the task's, from its data
    run: str  # random, the run's own
    at: float  # the program's time.time() when it started
    worker: str  # the label of the worker whose slot ran it
    last_seen: float  # the program's time.time() in its last datagram


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
        self._runs: dict[str, Run] = {}  # by the run's own id
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
            return [dataclasses.replace(run) for run in self._runs.values()]

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
                        self._record(orjson.loads(message), key.data)
                    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                        self.errors.append(f"a datagram that is not a run: {message[:100]!r}")

    def _record(self, body: dict[str, object], worker: str) -> None:
        run_id, now = str(body["run"]), float(str(body["now"]))
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                at = float(str(body["at"]))
                self._runs[run_id] = Run(str(body["token"]), run_id, at, worker, now)
            else:
                run.last_seen = max(run.last_seen, now)
