"""Bulk actions: ``POST /api/tasks/bulk`` cancelling and retrying N tasks, against the
same N cancelled one request at a time (``POST /api/tasks/{id}/cancel``, the baseline: what
a client or a dashboard without bulk actions does).

``python -m bench bulk [--tasks 1000] [--rounds 3] [--quick]``. A real ``taskledger api``
process on a throwaway database, broker memory:// and no workers, so tasks stay Pending
until acted on. Each round submits 2N tasks in two groups told apart by their description;
the bulk cancels one group (filter ``q``), the baseline cancels the other one by one over
one keep-alive connection; then the bulk retries the cancelled group. Every task must end
in the state its action gives it (checked through the API), and every bulk event must
carry its bulk id (checked in the log).
"""

from __future__ import annotations

import asyncio
import secrets
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from bench.http import RawConnection
from bench.processes import HOST, ManagedProcess, free_port, taskledger_env, tool, wait_ready
from bench.report import Run, eprint, markdown_table, median, num, over_rounds, parser
from bench.services import temporary_database
from ledger.log import EVENTS_TABLE

NAME = "bulk"


async def submit_group(conn: RawConnection, key: str, label: str, count: int) -> list[str]:
    ids = []
    for n in range(count):
        status, task = await conn.call(
            "POST", "/api/tasks", key, {"language": "echo", "description": f"{label} {n}"}
        )
        if status != 201:
            raise SystemExit(f"{NAME}: submit answered {status}: {task}")
        ids.append(str(task["id"]))
    return ids


async def views_caught_up(conn: RawConnection, key: str, timeout: float = 60.0) -> None:
    """Until the task list has every event (a bulk action selects from it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, stats = await conn.call("GET", "/api/stats", key)
        if stats["projections"]["task_status"]["lag_events"] == 0:
            return
        await asyncio.sleep(0.05)
    raise SystemExit(f"{NAME}: the views did not catch up within {timeout:g} s")


async def bulk(conn: RawConnection, key: str, action: str, q: str, status: str) -> Any:
    body = {"action": action, "filter": {"q": q, "status": [status]}}
    answer_status, answer = await conn.call("POST", "/api/tasks/bulk", key, body, timeout=300)
    if answer_status != 200:
        raise SystemExit(f"{NAME}: bulk {action} answered {answer_status}: {answer}")
    return answer


async def one_round(port: int, key: str, count: int, round_: int) -> dict[str, Any]:
    conn = RawConnection(port)
    try:
        bulk_group, single_group = f"bulk-r{round_}", f"single-r{round_}"
        bulk_ids = await submit_group(conn, key, bulk_group, count)
        single_ids = await submit_group(conn, key, single_group, count)
        await views_caught_up(conn, key)

        started = time.perf_counter()
        cancelled = await bulk(conn, key, "cancel", bulk_group, "Pending")
        bulk_cancel = time.perf_counter() - started

        started = time.perf_counter()
        for task_id in single_ids:
            status, answer = await conn.call("POST", f"/api/tasks/{task_id}/cancel", key)
            if status != 200:
                raise SystemExit(f"{NAME}: cancel answered {status}: {answer}")
        single_cancel = time.perf_counter() - started

        await views_caught_up(conn, key)
        started = time.perf_counter()
        retried = await bulk(conn, key, "retry", bulk_group, "Cancelled")
        bulk_retry = time.perf_counter() - started

        for answer in (cancelled, retried):
            if (answer["matched"], answer["done"]) != (count, count):
                raise SystemExit(f"{NAME}: CHECK FAILED: {answer}")
        for task_id in (bulk_ids[0], bulk_ids[-1]):
            _, task = await conn.call("GET", f"/api/tasks/{task_id}", key)
            if task["status"] != "Pending" or task["attempt"] != 2:
                raise SystemExit(f"{NAME}: CHECK FAILED: a bulk-retried task is {task}")
        return {
            "bulk_cancel": bulk_cancel,
            "single_cancel": single_cancel,
            "bulk_retry": bulk_retry,
            "bulk_ids": [cancelled["bulk_id"], retried["bulk_id"]],
        }
    finally:
        conn.drop()


def events_with_bulk_id(url: str, schema: str, bulk_id: str) -> int:
    query = "SELECT count(*) FROM {} WHERE convert_from(state, 'UTF8') LIKE %s"
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            sql.SQL(query).format(sql.Identifier(schema, EVENTS_TABLE)), (f'%"{bulk_id}"%',)
        ).fetchone()
    return int(row[0]) if row else 0


def main(argv: Sequence[str]) -> int:
    p = parser(NAME, __doc__)
    p.add_argument("--tasks", type=int, default=1_000, help="tasks per group (1000, at most)")
    args = p.parse_args(argv)
    if args.quick:
        args.tasks, args.rounds = 100, 1
    args.tasks = min(args.tasks, 1_000)  # a bulk action takes at most 1,000 tasks
    run = Run(NAME, argv)
    key, schema, port = secrets.token_hex(16), f"bench_{secrets.token_hex(4)}", free_port()
    rounds: list[dict[str, Any]] = []
    with (
        temporary_database(args.database_url) as url,
        tempfile.TemporaryDirectory(prefix="taskledger-bench-bulk-") as tmp,
    ):
        header = run.header(url)
        eprint(f"{NAME}: {header}")
        env = taskledger_env(url, "memory://", key, Path(tmp), DATABASE_SCHEMA=schema)
        command = [tool("taskledger"), "api", "--host", HOST, "--port", str(port)]
        server = ManagedProcess("api", command, env, Path(tmp)).start()
        try:
            eprint(f"  taskledger api ready in {wait_ready(server, f'http://{HOST}:{port}'):.1f} s")
            with asyncio.Runner() as loop:
                for round_ in range(args.rounds):
                    rounds.append(loop.run(one_round(port, key, args.tasks, round_)))
                    eprint(f"  round {round_ + 1}: {rounds[-1]}")
            marked = {
                bulk_id: events_with_bulk_id(url, schema, bulk_id)
                for result in rounds
                for bulk_id in result["bulk_ids"]
            }
        finally:
            stopped = server.stop()
    notes = [
        f"CHECK FAILED: bulk {bulk_id} is on {n} events, not {args.tasks}."
        for bulk_id, n in marked.items()
        if n != args.tasks
    ]
    if stopped.how != "SIGTERM" or stopped.leftovers_killed:
        notes.append(f"The server's stop: {stopped}.")

    def rates(name: str) -> list[float]:
        return [args.tasks / r[name] for r in rounds]

    baseline = median(rates("single_cancel")) or 0.0
    table = [
        [
            label,
            over_rounds(rates(name), 0),
            num(median([r[name] for r in rounds]), 2),
            f"{(median(rates(name)) or 0.0) / baseline:.1f}x" if baseline else "-",
        ]
        for name, label in (
            ("single_cancel", "one POST …/cancel per task (baseline)"),
            ("bulk_cancel", "POST /api/tasks/bulk cancel"),
            ("bulk_retry", "POST /api/tasks/bulk retry"),
        )
    ]
    print(
        f"# {NAME}: {header}\n\n`taskledger api`, broker memory://, no workers; {args.tasks}"
        f" tasks per action, {args.rounds} rounds; tasks/s median [range] over rounds.\n\n"
        + markdown_table(["action", "tasks/s", "seconds", "vs baseline"], table)
        + "\n\n"
        + "\n".join([*notes, run.footer()])
    )
    run.keep({"settings": vars(args), "rounds": rounds, "marked": marked}, args.no_json)
    return 1 if any(note.startswith("CHECK") for note in notes) else 0
