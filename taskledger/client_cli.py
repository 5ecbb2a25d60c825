"""The CLI's client commands: `taskledger submit`, `taskledger tasks …`, `taskledger
completion`. They talk to a server over HTTP through `taskledger.client`, configured by
--url/--api-key/--profile, TASKLEDGER_URL/TASKLEDGER_API_KEY or client.toml, never by the
server's settings: a client needs no database URL."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import shtab

from api.schemas import FeedEvent, HistoryItem, TaskOut
from taskledger import client_output as output
from taskledger.client import (
    TERMINAL,
    ApiError,
    Client,
    ClientError,
    ConnectionFailed,
    UsageError,
)

EXIT_CODES = {"Completed": 0, "Failed": 1, "Expired": 2, "Cancelled": 3}
EXIT_ERROR = 4  # a usage error, an API error, a connection failure, a wait that timed out

EXIT_EPILOG = """exit status (with --wait, and of `tasks watch`):
  0  the task Completed (its stdout on stdout, its stderr on stderr)
  1  it Failed (its last attempt's stderr and error on stderr)
  2  it Expired (ran past its ttl)
  3  it was Cancelled
  4  a usage or API error (the problem's detail on stderr), the server out of reach, or
     --timeout passed before the task ended (the task goes on; the message says where)
"""

STATUSES = ("Pending", "InProgress", "Completed", "Expired", "Failed", "Cancelled")
CLIENT_COMMANDS = ("submit", "tasks", "completion")


class ExitStatusFormatter(argparse.HelpFormatter):
    """Wraps descriptions as usual, and keeps the exit status table as it is written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("exit status"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class ClientParser(argparse.ArgumentParser):
    """A client command's parser: a usage error exits 4, since 2 means Expired here."""

    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n")


@contextlib.contextmanager
def client_parsers(action: argparse._SubParsersAction[Any]) -> Iterator[None]:
    """Parsers added to `action` inside the block are `ClientParser`s."""
    before = action._parser_class
    action._parser_class = ClientParser
    try:
        yield
    finally:
        action._parser_class = before


def add_client_commands(commands: argparse._SubParsersAction[Any]) -> None:
    """`submit`, `tasks` and `completion`, beside the server commands of taskledger/cli.py."""
    connection = argparse.ArgumentParser(add_help=False)
    where = connection.add_argument_group(
        "server",
        "default: TASKLEDGER_URL and TASKLEDGER_API_KEY, else the profile of "
        "TASKLEDGER_PROFILE (or 'default') in ~/.config/taskledger/client.toml; "
        "see docs/client.md",
    )
    where.add_argument("--url", help="the API's URL, e.g. http://127.0.0.1:8000")
    where.add_argument(
        "--api-key",
        help="the API key (visible to other users in ps: prefer TASKLEDGER_API_KEY or a profile)",
    )
    where.add_argument("--profile", help="a [profiles.NAME] table of client.toml")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    common = [connection, as_json]
    with client_parsers(commands):
        submit = commands.add_parser(
            "submit",
            parents=common,
            help="submit a task (client); --wait for its outcome",
            description="Submit a task to a taskledger server. Without --wait, print its id "
            "(or, with --json, the task). With --wait, wait for its outcome and exit with it.",
            epilog=EXIT_EPILOG,
            formatter_class=ExitStatusFormatter,
        )
        program = submit.add_argument(
            "file",
            nargs="?",
            metavar="FILE",
            help="the program (- reads standard input); its extension tells the language "
            "(.py python, .cs csharp)",
        )
        program.complete = shtab.FILE
        submit.add_argument("--code", help="the program as text, instead of FILE")
        submit.add_argument("--language", help="python, csharp or echo (default: from FILE)")
        submit.add_argument(
            "--data",
            metavar="JSON|@FILE",
            help="the input, as JSON text, or @file, or @- "
            "(standard input); the program reads it on stdin",
        )
        submit.add_argument("--ttl", type=float, metavar="S", help="time budget of an attempt")
        submit.add_argument("--max-attempts", type=int, metavar="N", help="attempts per run")
        submit.add_argument("--description", help="default: the file's name")
        submit.add_argument(
            "--idempotency-key",
            metavar="KEY",
            help="the same key and body a second time answer the first task (default: new)",
        )
        submit.add_argument("--wait", action="store_true", help="wait for the outcome")
        submit.add_argument(
            "--timeout",
            type=float,
            metavar="S",
            help="with --wait: give up after S seconds, exit 4 (default: no limit)",
        )
        tasks = commands.add_parser(
            "tasks",
            help="list, show, watch, retry and cancel tasks (client)",
            description="Tasks of a taskledger server (tables, or --json).",
        )
        submit.set_defaults(run=run_submit)
        tasks.set_defaults(run=None)
        actions = tasks.add_subparsers(
            dest="action", required=True, metavar="ACTION", parser_class=ClientParser
        )
        listing = actions.add_parser("list", parents=common, help="tasks, newest first")
        listing.add_argument(
            "--status", action="append", choices=STATUSES, help="any of these (repeat)"
        )
        listing.add_argument("--language", help="python, csharp or echo")
        listing.add_argument(
            "--created-after",
            type=moment,
            metavar="TIME",
            help="ISO 8601 with a time zone, e.g. 2030-01-01T00:00:00Z",
        )
        listing.add_argument("--created-before", type=moment, metavar="TIME")
        listing.add_argument("--search", metavar="TEXT", help="the description contains it")
        listing.add_argument(
            "--limit", type=int, default=50, metavar="N", help="show at most N (default 50; 0: all)"
        )
        listing.set_defaults(run=run_list)
        for name, run, help_text in (
            ("show", run_show, "one task: status, attempts, output"),
            ("history", run_history, "every event of a task, in order"),
        ):
            parser = actions.add_parser(name, parents=common, help=help_text)
            parser.add_argument("task_id", type=task_id, metavar="ID")
            parser.set_defaults(run=run)
        retry = actions.add_parser(
            "retry", parents=common, help="run a Failed, Expired or Cancelled task again"
        )
        retry.add_argument("task_id", type=task_id, metavar="ID")
        retry.add_argument("--ttl", type=float, metavar="S", help="a new time budget")
        retry.set_defaults(run=run_retry)
        cancel = actions.add_parser("cancel", parents=common, help="cancel a task not ended")
        cancel.add_argument("task_id", type=task_id, metavar="ID")
        cancel.add_argument("--reason", help="why (recorded on the event)")
        cancel.set_defaults(run=run_cancel)
        watch = actions.add_parser(
            "watch",
            parents=common,
            help="follow a task's events until it ends; exit with its outcome",
            description="Print a task's events as they happen, until it ends, and exit with "
            "its outcome. --json: one JSON object per event (JSON Lines).",
            epilog=EXIT_EPILOG,
            formatter_class=ExitStatusFormatter,
        )
        watch.add_argument("task_id", type=task_id, metavar="ID")
        watch.add_argument(
            "--timeout",
            type=float,
            metavar="S",
            help="give up after S seconds, exit 4 (default: no limit)",
        )
        watch.set_defaults(run=run_watch)
        completion = commands.add_parser(
            "completion",
            help="print a shell completion script",
            description="Print a completion script for the shell. bash: "
            "`taskledger completion bash > ~/.local/share/bash-completion/completions/"
            'taskledger`; zsh: `taskledger completion zsh > "${fpath[1]}/_taskledger"`.',
        )
        completion.add_argument("shell", choices=["bash", "zsh"])
        completion.set_defaults(run=None)


def moment(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"give a time zone (Z, +02:00): {text!r}")
    return value


def task_id(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a task id (a UUID): {text!r}") from None


# -- running them ------------------------------------------------------------------------------


def run_client_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run a client command; its errors as messages on stderr and exit 4, never a trace."""
    if args.command == "completion":
        sys.stdout.write(shtab.complete(parser, shell=args.shell))
        return 0
    key_source = None
    try:
        with Client(args.url, args.api_key, profile=args.profile) as client:
            key_source = client.config.key_source
            code: int = args.run(client, args)
            return code
    except ApiError as error:
        output.show_error(error, key_source)
    except ConnectionFailed as error:
        print(f"taskledger: cannot reach the server: {error}", file=sys.stderr)
    except ClientError as error:
        print(f"taskledger: {error}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `taskledger tasks list | head`: the reader left; nothing more to say.
        with contextlib.suppress(OSError):
            sys.stdout = open("/dev/null", "w")  # noqa: SIM115 - Python flushes it at exit
        return 0
    return EXIT_ERROR


def program_text(args: argparse.Namespace) -> tuple[str | None, Path | None]:
    """(code, file) from FILE or --code; standard input for `-`."""
    if args.file is not None and args.code is not None:
        raise UsageError("give FILE or --code, not both")
    if args.file == "-":
        if args.language is None:
            raise UsageError("with code on standard input (-), say --language")
        return sys.stdin.read(), None
    if args.file is not None:
        return None, Path(args.file)
    if args.code is None and args.language != "echo":
        raise UsageError("give the program: FILE, - (standard input) or --code")
    return args.code, None


def data_argument(text: str | None) -> Any:
    if text is None:
        return None
    source = "--data"
    if text.startswith("@"):
        name = text[1:]
        source = "standard input" if name == "-" else name
        try:
            text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError(f"--data: cannot read {name}: {error}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"--data: {source} is not JSON: {error}") from None


def run_submit(client: Client, args: argparse.Namespace) -> int:
    code, file = program_text(args)
    task = client.submit(
        code,
        file=file,
        language=args.language,
        data=data_argument(args.data),
        ttl_seconds=args.ttl,
        max_attempts=args.max_attempts,
        description=args.description,
        idempotency_key=args.idempotency_key,
    )
    if not args.wait:
        if args.json:
            output.print_json(task)
        else:
            print(task.id)
        return 0
    timeout = math.inf if args.timeout is None else args.timeout
    return outcome(client, client.wait(task.id, timeout), args, timeout)


def outcome(client: Client, task: TaskOut, args: argparse.Namespace, waited: float) -> int:
    """What `submit --wait` and `tasks watch` print and exit with, for a task as it ended
    (or did not, by the timeout)."""
    if task.status not in TERMINAL:
        if args.json and args.command == "submit":
            output.print_json(task)
        print(
            f"taskledger: task {task.id} is still {task.status} after {waited:g} s; it goes "
            f"on (`taskledger tasks watch {task.id}`)",
            file=sys.stderr,
        )
        return EXIT_ERROR
    if args.json:
        if args.command == "submit":
            output.print_json(task)
        return EXIT_CODES[task.status]
    if task.result is not None:
        sys.stdout.write(task.result.stdout)
        sys.stdout.flush()
        sys.stderr.write(task.result.stderr)
        if task.result.truncated:
            print("taskledger: the output was cut at the server's limit", file=sys.stderr)
    elif task.status == "Failed":
        stderr = failed_stderr(client, task)
        sys.stderr.write(stderr)
        if stderr and not stderr.endswith("\n"):
            sys.stderr.write("\n")
    if task.status != "Completed":
        why = f": {task.error.kind}: {task.error.message}" if task.error else ""
        if task.status == "Expired":
            why = f": it ran past its ttl of {task.ttl_seconds:g} s"
        print(f"taskledger: task {task.id} {task.status}{why}", file=sys.stderr)
    return EXIT_CODES[task.status]


def failed_stderr(client: Client, task: TaskOut) -> str:
    """The last failed attempt's stderr, kept on its event (the task shows kind and
    message only)."""
    for item in reversed(client.history(task.id)):
        if item.type == "AttemptFailed":
            error = item.data.get("error") or {}
            return str(error.get("stderr") or "")
    return ""


def run_list(client: Client, args: argparse.Namespace) -> int:
    tasks = client.list(
        status=args.status,
        language=args.language,
        created_after=args.created_after,
        created_before=args.created_before,
        q=args.search,
        page_size=min(args.limit, 500) if args.limit > 0 else 500,
    )
    chosen = (task for number, task in enumerate(tasks) if not args.limit or number < args.limit)
    if args.json:
        output.print_json(list(chosen))
    else:
        output.show_list(chosen)
    return 0


def run_show(client: Client, args: argparse.Namespace) -> int:
    task = client.get(args.task_id)
    output.print_json(task) if args.json else output.show_task(task)
    return 0


def run_history(client: Client, args: argparse.Namespace) -> int:
    items = client.history(args.task_id)
    if args.json:
        output.print_json(items)
    else:
        output.show_history(items)
    return 0


def run_retry(client: Client, args: argparse.Namespace) -> int:
    task = client.retry(args.task_id, ttl_seconds=args.ttl)
    output.print_json(task) if args.json else output.show_task(task)
    return 0


def run_cancel(client: Client, args: argparse.Namespace) -> int:
    task = client.cancel(args.task_id, reason=args.reason)
    output.print_json(task) if args.json else output.show_task(task)
    return 0


def run_watch(client: Client, args: argparse.Namespace) -> int:
    """The task's events so far (its history), then each new one from the event feed, until
    it is terminal; exit with its outcome."""
    shown = 0  # the last version printed
    after = 0  # the last position seen in the log
    while True:
        # History, then the task: if the task has moved past what the history showed,
        # read the history again, so that no event between the two reads goes unprinted.
        for item in client.history(args.task_id):
            after = max(after, item.position or 0)
            if item.version > shown:
                show(as_feed_event(item, args.task_id), args)
                shown = item.version
        task = client.get(args.task_id)
        if task.version <= shown:
            break
    if task.status not in TERMINAL:
        for event in client.events(after=after, follow=True, timeout=args.timeout):
            if event.task_id != task.id or event.version <= shown:
                continue
            show(event, args)
            shown = event.version
            task = client.get(args.task_id)
            if task.status in TERMINAL:
                break
        else:
            task = client.get(args.task_id)  # the timeout passed: as it is now
    return outcome(client, task, args, math.inf if args.timeout is None else args.timeout)


def as_feed_event(item: HistoryItem, task: UUID) -> FeedEvent:
    """A history item in the feed's shape, so that `watch --json` prints one kind of line."""
    fields = item.model_dump()
    return FeedEvent.model_validate({**fields, "position": item.position or 0, "task_id": task})


def show(event: FeedEvent, args: argparse.Namespace) -> None:
    if args.json:
        output.watched_json(event)
    else:
        output.show_transition(event.version, event.at, event.type, event.data)
