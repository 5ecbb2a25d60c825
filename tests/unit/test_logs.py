from __future__ import annotations

import asyncio
import logging
import threading
from datetime import UTC, datetime
from pathlib import Path

import anyio
import orjson

from taskledger.logs import DailyFileHandler, JsonFormatter, configure_logging, log_context


def record(message: str, when: datetime, **extra: object) -> logging.LogRecord:
    entry = logging.makeLogRecord({"msg": message, "levelname": "INFO", "name": "api", **extra})
    entry.created = when.timestamp()
    return entry


def test_json_lines_go_to_a_file_per_role_and_day(tmp_path: Path) -> None:
    handler = DailyFileHandler(tmp_path / "logs", "api")
    handler.setFormatter(JsonFormatter())
    handler.emit(record("request", datetime(2030, 1, 1, 23, 59, tzinfo=UTC), task_id="t-1"))
    handler.emit(record("request", datetime(2030, 1, 2, 0, 1, tzinfo=UTC), status=201))
    handler.close()
    first = (tmp_path / "logs" / "api-2030-01-01.log").read_text().splitlines()
    second = (tmp_path / "logs" / "api-2030-01-02.log").read_text().splitlines()
    assert [orjson.loads(line)["task_id"] for line in first] == ["t-1"]
    line = orjson.loads(second[0])
    assert (line["msg"], line["status"], line["level"]) == ("request", 201, "info")
    assert line["ts"].startswith("2030-01-02T00:01")


def test_log_context_fields_reach_every_line_inside_it_even_in_tasks_and_threads(
    tmp_path: Path,
) -> None:
    handler = DailyFileHandler(tmp_path, "worker")
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("test_logs.context")
    log.addHandler(handler)
    log.setLevel(logging.INFO)

    async def attempt(task_id: str) -> None:
        with log_context(task_id=task_id, attempt=2):
            log.info("started")
            await anyio.to_thread.run_sync(lambda: log.info("in a thread"))
            await asyncio.create_task(asyncio.sleep(0))
            log.info("explicit wins", extra={"attempt": 3})

    async def both() -> None:
        await asyncio.gather(attempt("t-1"), attempt("t-2"))
        log.info("outside")

    try:
        asyncio.run(both())
    finally:
        log.removeHandler(handler)
        handler.close()
    (path,) = tmp_path.iterdir()
    lines = [orjson.loads(line) for line in path.read_text().splitlines()]
    inside = [(line["task_id"], line["attempt"], line["msg"]) for line in lines[:-1]]
    assert sorted(inside) == sorted(
        (task, attempt, msg)
        for task in ("t-1", "t-2")
        for attempt, msg in ((2, "started"), (2, "in a thread"), (3, "explicit wins"))
    )
    assert "task_id" not in lines[-1]


def test_long_lines_of_two_processes_of_a_role_do_not_interleave(tmp_path: Path) -> None:
    # Two handlers on one file stand for two workers on one machine: lines far over any
    # buffer size stay whole.
    handlers = [DailyFileHandler(tmp_path, "worker") for _ in range(2)]
    for handler in handlers:
        handler.setFormatter(JsonFormatter())
    now = datetime.now(UTC)

    def write(handler: DailyFileHandler, name: str) -> None:
        for _ in range(50):
            handler.emit(record(name * 100_000, now, writer=name))

    threads = [
        threading.Thread(target=write, args=(handler, name))
        for handler, name in zip(handlers, "ab", strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for handler in handlers:
        handler.close()
    (path,) = tmp_path.iterdir()
    lines = [orjson.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 100
    assert all(line["msg"] == line["writer"] * 100_000 for line in lines)


def test_configure_logging_takes_a_level_name_and_writes_the_role_file(tmp_path: Path) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure_logging("WARNING", role="projections", log_dir=tmp_path)
        logging.getLogger("x").info("hidden")
        logging.getLogger("x").warning("shown", extra={"task_id": "t-9", "attempt": 1})
        for handler in root.handlers:
            handler.close()
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    (path,) = tmp_path.iterdir()
    assert path.name == f"projections-{datetime.now(UTC):%Y-%m-%d}.log"
    (line,) = [orjson.loads(line) for line in path.read_text().splitlines()]
    assert (line["msg"], line["task_id"], line["attempt"]) == ("shown", "t-9", 1)
