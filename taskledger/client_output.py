"""How the CLI's client commands show tasks and events: rich tables for people, JSON for
scripts (one document per command; `tasks watch --json`, one line per event)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from pydantic import BaseModel, TypeAdapter
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from api.schemas import FeedEvent, HistoryItem, TaskOut, TaskSummaryOut
from taskledger.client import ApiError

STATUS_STYLES = {
    "Pending": "yellow",
    "InProgress": "cyan",
    "Completed": "green",
    "Failed": "red",
    "Expired": "magenta",
    "Cancelled": "dim",
}


def console() -> Console:
    # Piped or redirected, rich would assume 80 columns and squeeze the tables: wider
    # lines read better in a file (scripts read --json). highlight off: ids are not numbers
    # to color.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def print_json(model: BaseModel | Sequence[BaseModel], *, indent: int | None = 2) -> None:
    if isinstance(model, BaseModel):
        text = model.model_dump_json(indent=indent)
    else:
        text = TypeAdapter(list[Any]).dump_json(list(model), indent=indent).decode()
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def status_text(status: str) -> str:
    return f"[{STATUS_STYLES.get(status, 'default')}]{status}[/]"


def when(moment: datetime | None) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z") if moment else "-"


def short_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def show_task(task: TaskOut) -> None:
    out = console()
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    rows: list[tuple[str, str]] = [
        ("id", str(task.id)),
        ("status", status_text(task.status)),
        ("description", escape(task.description) or "-"),
        ("language", task.language),
        ("attempt", f"{task.attempt} (run attempt {task.run_attempt} of {task.max_attempts})"),
        ("ttl", f"{task.ttl_seconds:g} s, deadline {when(task.deadline)}"),
        ("created", when(task.created_at)),
        ("started", when(task.started_at)),
        ("finished", when(task.finished_at)),
        ("worker", task.worker_id or "-"),
        ("version", str(task.version)),
    ]
    if task.result is not None:
        result = task.result
        cut = ", output cut at the limit" if result.truncated else ""
        rows.append(("result", f"exit code {result.exit_code}, {result.duration_ms:.1f} ms{cut}"))
    if task.error is not None:
        rows.append(("error", f"[red]{escape(task.error.kind)}[/]: {escape(task.error.message)}"))
    for name, value in rows:
        grid.add_row(name, value)
    out.print(grid)
    if task.result is not None:
        for name, text in (("stdout", task.result.stdout), ("stderr", task.result.stderr)):
            if text:
                out.rule(name, align="left", style="dim")
                out.out(text, end="" if text.endswith("\n") else "\n", highlight=False)


def show_list(tasks: Iterable[TaskSummaryOut]) -> int:
    table = Table(box=None, header_style="bold", pad_edge=False)
    # The id is never cut (it is what one copies); the texts give way in a narrow terminal.
    table.add_column("id", no_wrap=True, min_width=36)
    table.add_column("status", no_wrap=True, min_width=10)
    table.add_column("language", no_wrap=True)
    table.add_column("attempt", justify="right", no_wrap=True)
    table.add_column("created (UTC)", no_wrap=True)
    table.add_column("description", no_wrap=True, overflow="ellipsis", max_width=40)
    table.add_column("summary", no_wrap=True, overflow="ellipsis", max_width=60)
    count = 0
    for task in tasks:
        count += 1
        table.add_row(
            str(task.id),
            status_text(task.status),
            task.language,
            f"{task.attempt}/{task.max_attempts}",
            short_time(task.created_at),
            escape(task.description),
            escape(task.summary or ""),
        )
    out = console()
    if count:
        out.print(table)
    else:
        out.print("no tasks", style="dim")
    return count


def event_details(data: dict[str, Any], width: int = 40) -> str:
    """An event's fields on one line, `name=value`, each value cut at `width` characters
    (`tasks history --json` has them whole)."""
    parts = []
    for name, value in data.items():
        if value in (None, "", {}, []):
            continue
        text = json.dumps(value, ensure_ascii=False, default=str)
        parts.append(f"{name}={text if len(text) <= width else text[: width - 1] + '…'}")
    return " ".join(parts)


def show_history(items: Sequence[HistoryItem]) -> None:
    out = console()
    # The details get what the other columns leave, cut to it: rich, short of room, would
    # squeeze the narrow columns out instead.
    room = max(20, out.width - 65)
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("version", justify="right", no_wrap=True)
    table.add_column("at (UTC)", no_wrap=True)
    table.add_column("event", no_wrap=True)
    table.add_column("position", justify="right", no_wrap=True)
    table.add_column("details", no_wrap=True)
    for item in items:
        details = event_details(item.data)
        table.add_row(
            str(item.version),
            when(item.at),
            item.type,
            "-" if item.position is None else str(item.position),
            escape(details if len(details) <= room else details[: room - 1] + "…"),
        )
    out.print(table)


def show_transition(version: int, at: datetime, kind: str, data: dict[str, Any]) -> None:
    """One line of `tasks watch`."""
    details = escape(event_details(data))
    console().print(f"{when(at)}  v{version:<3} [bold]{kind}[/]  [dim]{details}[/]", soft_wrap=True)


def watched_json(event: FeedEvent) -> None:
    sys.stdout.write(event.model_dump_json() + "\n")
    sys.stdout.flush()


def show_error(error: ApiError, key_source: str | None = None) -> None:
    """The problem's detail and its field errors on stderr (plain: no wrapping, no markup)."""
    lines = [f"taskledger: {error}"]
    lines += [f"  {problem.field}: {problem.message}" for problem in error.errors]
    if error.status == 401 and key_source:
        lines.append(f"  (the key came from {key_source})")
    if error.problem.request_id:
        lines.append(f"  request id: {error.problem.request_id}")
    print("\n".join(lines), file=sys.stderr)
