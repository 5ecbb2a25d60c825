"""JSON-lines logging: one object per line, with the structured `extra` fields of the call
and those of the enclosing `log_context` (a task's id and attempt, say)."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import orjson

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "taskName",
    "_taskledger_json",  # JsonFormatter's own cache
}

# Never mutated, only replaced (log_context sets a new dict), so one shared default is safe.
_context: ContextVar[dict[str, Any]] = ContextVar("taskledger_log_context", default={})  # noqa: B039


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add `fields` to every line logged inside the block, in this thread or asyncio task and
    in what they start (`asyncio.create_task`, `anyio.to_thread`, `contextvars.copy_context`).

    A field given to one call's `extra=` wins over the context's.
    """
    token = _context.set({**_context.get(), **fields})
    try:
        yield
    finally:
        _context.reset(token)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        # Formatted once per record, however many handlers (stdout, the daily file) ask.
        cached: str | None = record.__dict__.get("_taskledger_json")
        if cached is None:
            cached = self._format(record)
            record.__dict__["_taskledger_json"] = cached
        return cached

    def _format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_context.get())
        entry.update((k, v) for k, v in vars(record).items() if k not in _STANDARD)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class DailyFileHandler(logging.Handler):
    """Append to `<directory>/<role>-YYYY-MM-DD.log`, a new file each UTC day.

    The file is opened for appending and each line is written and flushed whole, so
    processes of one role sharing the directory (two workers on one machine) keep their
    lines intact.
    """

    def __init__(self, directory: Path, role: str) -> None:
        super().__init__()
        self.directory = directory
        self.role = role
        self._day = ""
        self._stream: TextIO | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            day = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%d")
            if day != self._day or self._stream is None:
                if self._stream is not None:
                    self._stream.close()
                self.directory.mkdir(parents=True, exist_ok=True)
                path = self.directory / f"{self.role}-{day}.log"
                self._stream = path.open("a", encoding="utf-8")
                self._day = day
            self._stream.write(self.format(record) + "\n")
            self._stream.flush()
        except Exception:  # noqa: BLE001 - logging must never take the process down
            self.handleError(record)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        super().close()


def configure_logging(
    level: int | str = logging.INFO, *, role: str | None = None, log_dir: Path | None = None
) -> None:
    """JSON lines to stdout, and to `log_dir/<role>-YYYY-MM-DD.log` when both are given.

    `level`: a number or a name (`"INFO"`).
    """
    formatter = JsonFormatter()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if role is not None and log_dir is not None:
        handlers.append(DailyFileHandler(log_dir, role))
    for handler in handlers:
        handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in root.handlers:
        old.close()
    root.handlers[:] = handlers
    root.setLevel(level)
