"""The CLI's client commands as a user runs them: `python -m taskledger` processes with no
server settings at all (no TASKLEDGER_DATABASE_URL), against a real `taskledger dev`.
Exit codes of each outcome, --json parsed, `tasks watch` followed to the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskledger.client import Client
from tests.integration.client_server import Server, dev_server

pytestmark = [pytest.mark.postgres, pytest.mark.rabbitmq]


@pytest.fixture(scope="module")
def server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with dev_server(database_url, tmp_path_factory.mktemp("cli-dev")) as running:
        yield running


@pytest.fixture
def env(server: Server, tmp_path: Path) -> dict[str, str]:
    """A client's environment: the URL and key, and no server setting whatsoever."""
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("TASKLEDGER_")}
    clean |= {
        "TASKLEDGER_URL": server.url,
        "TASKLEDGER_API_KEY": server.key(),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),  # no client.toml of the machine's
    }
    assert "TASKLEDGER_DATABASE_URL" not in clean
    return clean


def taskledger(
    *args: str, env: dict[str, str], cwd: Path | None = None, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "taskledger", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )


def no_traceback(run: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in run.stderr, run.stderr


# -- submit --wait: one exit code per outcome --------------------------------------------------


def test_completed_exits_0_with_the_programs_output(env: dict[str, str], tmp_path: Path) -> None:
    program = tmp_path / "add.py"
    program.write_text("import sys\nprint(sum(data))\nprint('note', file=sys.stderr)\n")
    run = taskledger("submit", str(program), "--data", "[1, 2, 3]", "--wait", env=env)
    assert (run.returncode, run.stdout, run.stderr) == (0, "6\n", "note\n")


def test_failed_exits_1_with_its_stderr(env: dict[str, str]) -> None:
    code = "import sys\nprint('bad input', file=sys.stderr)\nsys.exit(3)\n"
    run = taskledger(
        "submit", "--code", code, "--language", "python", "--max-attempts", "1", "--wait", env=env
    )
    assert run.returncode == 1, run
    assert "bad input" in run.stderr
    assert "Failed: program_error: exit status 3" in run.stderr
    assert run.stdout == ""


def test_expired_exits_2(env: dict[str, str]) -> None:
    run = taskledger(
        "submit",
        "--code",
        "import time; time.sleep(10)",
        "--language",
        "python",
        "--ttl",
        "1",
        "--max-attempts",
        "1",
        "--wait",
        env=env,
    )
    assert run.returncode == 2, run
    assert "Expired: it ran past its ttl of 1 s" in run.stderr


def test_cancelled_while_waiting_exits_3(server: Server, env: dict[str, str]) -> None:
    description = f"cancel-me-{uuid.uuid4().hex[:8]}"
    waiting = subprocess.Popen(
        [
            *(sys.executable, "-m", "taskledger", "submit"),
            *("--code", "import time; time.sleep(60)", "--language", "python"),
            *("--description", description, "--wait", "--json"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with Client(server.url, server.key()) as tl:
            deadline = time.monotonic() + 30
            tasks = []
            while not tasks and time.monotonic() < deadline:
                tasks = list(tl.list(q=description))
                time.sleep(0.1)
            assert tasks, "the submitted task never appeared"
            time.sleep(0.5)  # well into its wait
            tl.cancel(tasks[0].id, reason="from the test")
        out, err = waiting.communicate(timeout=30)
    finally:
        waiting.kill()
    assert waiting.returncode == 3, err
    task = json.loads(out)
    assert (task["status"], task["id"]) == ("Cancelled", str(tasks[0].id))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--code", "x", "--language", "ruby"], "language: Input should be"),
        (["program.rb"], "cannot guess the language of program.rb"),
        (["--data", "{not json", "--code", "1", "--language", "python"], "--data"),
        (["--code", "1"], "say which language"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--ttl", "soon"], "invalid float value"),
    ],
)
def test_usage_and_api_errors_exit_4_without_a_traceback(
    env: dict[str, str], tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "program.rb").write_text("puts 1\n")
    run = taskledger("submit", *args, "--wait", env=env, cwd=tmp_path)
    assert run.returncode == 4, run
    assert message in run.stderr
    no_traceback(run)


def test_a_wait_that_times_out_exits_4_and_says_so(env: dict[str, str]) -> None:
    code = "import time; time.sleep(30)"
    run = taskledger(
        "submit", "--code", code, "--language", "python", "--wait", "--timeout", "1", env=env
    )
    assert run.returncode == 4, run
    assert "is still" in run.stderr
    assert "after 1 s" in run.stderr


def test_without_wait_it_prints_the_id_or_the_task(env: dict[str, str]) -> None:
    plain = taskledger("submit", "--language", "echo", "--data", '{"a": 1}', env=env)
    assert plain.returncode == 0, plain
    uuid.UUID(plain.stdout.strip())
    as_json = subprocess.run(
        [
            sys.executable,
            "-m",
            "taskledger",
            "submit",
            "--language",
            "echo",
            "--data",
            "@-",
            "--json",
        ],
        env=env,
        input='{"from": "stdin"}',
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert as_json.returncode == 0, as_json
    task = json.loads(as_json.stdout)
    assert (task["language"], task["data"]) == ("echo", {"from": "stdin"})


def test_data_from_a_file_and_the_task_as_json(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "input.json").write_text('{"n": [4, 5]}')
    run = taskledger(
        "submit", "--language", "echo", "--data", "@input.json", "--wait", "--json",
        env=env, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run
    task = json.loads(run.stdout)
    assert (task["status"], task["data"]) == ("Completed", {"n": [4, 5]})


# -- tasks … -----------------------------------------------------------------------------------


def test_tasks_commands_in_json(env: dict[str, str]) -> None:
    description = f"json-{uuid.uuid4().hex[:8]}"
    submitted = taskledger(
        "submit", "--code", "print(1)", "--language", "python", "--description", description,
        "--wait", "--json", env=env,
    )  # fmt: skip
    task_id = json.loads(submitted.stdout)["id"]
    shown = json.loads(taskledger("tasks", "show", task_id, "--json", env=env).stdout)
    assert (shown["id"], shown["status"], shown["result"]["stdout"]) == (
        task_id,
        "Completed",
        "1\n",
    )
    history = json.loads(taskledger("tasks", "history", task_id, "--json", env=env).stdout)
    assert [item["type"] for item in history][-1] == "AttemptCompleted"
    deadline = time.monotonic() + 20
    while True:
        listed = json.loads(
            taskledger("tasks", "list", "--search", description, "--json", env=env).stdout
        )
        if listed or time.monotonic() > deadline:
            break
    assert [item["id"] for item in listed] == [task_id]
    refused = taskledger("tasks", "cancel", task_id, "--json", env=env)
    assert refused.returncode == 4
    assert "409 Conflict" in refused.stderr
    assert refused.stdout == ""
    missing = taskledger("tasks", "show", str(uuid.uuid4()), env=env)
    assert missing.returncode == 4
    assert "404 Not found" in missing.stderr


def test_tasks_commands_as_tables(env: dict[str, str]) -> None:
    run = taskledger(
        "submit", "--code", "raise SystemExit(5)", "--language", "python",
        "--max-attempts", "1", "--description", "table row", "--wait", env=env,
    )  # fmt: skip
    assert run.returncode == 1
    task_id = run.stderr.split("task ")[-1].split()[0]
    shown = taskledger("tasks", "show", task_id, env=env)
    assert shown.returncode == 0
    assert "Failed" in shown.stdout
    assert "program_error" in shown.stdout
    retried = taskledger("tasks", "retry", task_id, "--ttl", "30", env=env)
    assert retried.returncode == 0, retried.stderr
    assert task_id in retried.stdout
    history = taskledger("tasks", "history", task_id, env=env)
    assert "AttemptFailed" in history.stdout
    listing = taskledger("tasks", "list", "--limit", "3", env=env)
    assert listing.returncode == 0
    assert "status" in listing.stdout.splitlines()[0]


def test_watch_follows_a_task_to_its_end(env: dict[str, str]) -> None:
    code = "import time\ntime.sleep(1.5)\nprint('done')\n"
    task_id = taskledger("submit", "--code", code, "--language", "python", env=env).stdout.strip()
    watched = taskledger("tasks", "watch", task_id, "--json", env=env)
    assert watched.returncode == 0, watched.stderr
    events = [json.loads(line) for line in watched.stdout.splitlines()]
    assert [event["type"] for event in events] == [
        "TaskSubmitted",
        "AttemptScheduled",
        "AttemptStarted",
        "AttemptCompleted",
    ]
    assert {event["task_id"] for event in events} == {task_id}
    assert [event["version"] for event in events] == [1, 2, 3, 4]
    # A finished task: its story, and the exit code of its outcome, at once.
    again = taskledger("tasks", "watch", task_id, env=env)
    assert again.returncode == 0
    assert "AttemptCompleted" in again.stdout
    assert again.stdout.rstrip().endswith("done")


def test_watch_exits_with_the_outcome_of_a_cancel(server: Server, env: dict[str, str]) -> None:
    code = "import time; time.sleep(60)"
    task_id = taskledger("submit", "--code", code, "--language", "python", env=env).stdout.strip()
    watching = subprocess.Popen(
        [sys.executable, "-m", "taskledger", "tasks", "watch", task_id],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(2)
        with Client(server.url, server.key()) as tl:
            tl.cancel(task_id)
        out, err = watching.communicate(timeout=30)
    finally:
        watching.kill()
    assert watching.returncode == 3, err
    assert "TaskCancelled" in out


# -- configuration, help, completion -----------------------------------------------------------


def test_a_profile_of_client_toml(server: Server, env: dict[str, str], tmp_path: Path) -> None:
    config = tmp_path / "config" / "taskledger" / "client.toml"
    config.parent.mkdir(parents=True)
    config.write_text(
        f'[profiles.test]\nurl = "{server.url}"\napi_key = "{server.key("acme-read")}"\n'
    )
    bare = {k: v for k, v in env.items() if k not in ("TASKLEDGER_URL", "TASKLEDGER_API_KEY")}
    listed = taskledger("tasks", "list", "--profile", "test", "--json", env=bare)
    assert listed.returncode == 0, listed.stderr
    assert isinstance(json.loads(listed.stdout), list)
    # The read key of the profile may not submit: 403, said plainly.
    refused = taskledger("submit", "--language", "echo", "--profile", "test", env=bare)
    assert refused.returncode == 4
    assert "403 Forbidden" in refused.stderr
    nowhere = taskledger("tasks", "list", env=bare)
    assert nowhere.returncode == 4
    assert "TASKLEDGER_URL" in nowhere.stderr
    assert "client.toml" in nowhere.stderr
    no_traceback(nowhere)


def test_a_wrong_key_says_where_it_came_from(env: dict[str, str]) -> None:
    run = taskledger("tasks", "list", env={**env, "TASKLEDGER_API_KEY": "wrong-0123456789abcd"})
    assert run.returncode == 4
    assert "401 Unauthorized" in run.stderr
    assert "TASKLEDGER_API_KEY" in run.stderr


def test_a_server_out_of_reach_exits_4(env: dict[str, str]) -> None:
    run = taskledger("tasks", "list", "--url", "http://127.0.0.1:9", env=env)
    assert run.returncode == 4
    assert "cannot reach the server" in run.stderr
    assert "http://127.0.0.1:9/api/tasks" in run.stderr
    no_traceback(run)


def test_help_lists_the_exit_codes(env: dict[str, str]) -> None:
    for command in (["submit"], ["tasks", "watch"]):
        run = taskledger(*command, "--help", env=env)
        assert run.returncode == 0
        for line in (
            "0  the task Completed",
            "1  it Failed",
            "2  it Expired",
            "3  it was Cancelled",
        ):
            assert line in run.stdout
        assert "4  a usage or API error" in run.stdout


def test_completion_scripts(env: dict[str, str], tmp_path: Path) -> None:
    bash = taskledger("completion", "bash", env=env)
    assert bash.returncode == 0
    script = tmp_path / "taskledger.bash"
    script.write_text(bash.stdout)
    completed = subprocess.run(
        [
            "bash",
            "-c",
            f"source {script}; COMP_WORDS=(taskledger tasks w); COMP_CWORD=2; "
            'COMP_LINE="taskledger tasks w"; COMP_POINT=${#COMP_LINE}; '
            '_shtab_taskledger; echo "${COMPREPLY[@]}"',
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert completed.stdout.split() == ["watch"]
    zsh = taskledger("completion", "zsh", env=env)
    assert zsh.returncode == 0
    assert zsh.stdout.startswith("#compdef taskledger")
