from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

import orjson

from taskledger.logs import DailyFileHandler, JsonFormatter


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
