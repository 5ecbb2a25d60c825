"""`taskledger dev` on its embedded default, with code, data and output at their limits.

One real `taskledger dev` process for the module (its own data directory, so its own
embedded PostgreSQL over a Unix socket; no database URL), driven over HTTP. Hypothesis
picks sizes near each limit, read from the code that enforces it:

- code: at most `TaskLimits.code_bytes` UTF-8 bytes; one byte more is a 422 naming `code`;
- data: at most `TaskLimits.data_bytes` bytes as compact JSON; one more, a 422 naming `data`;
- output: the first `TaskLimits.output_bytes` bytes of each of stdout and stderr are kept,
  the rest dropped, with `truncated: true` (docs/sandbox.md, docs/ledger.md).

Every task accepted at its limits must complete, and read back whole: its code and data as
sent, its output exactly as the program wrote it, or cut at the cap as documented.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import psutil
import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ledger import TaskLimits
from tests.processes import free_port, stop, wait_until_serving

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CODE_CAP = TaskLimits().code_bytes
DATA_CAP = TaskLimits().data_bytes
OUTPUT_CAP = TaskLimits().output_bytes

# Characters of 1 to 4 UTF-8 bytes, so that limits in bytes meet multi-byte characters (an
# output cut at the cap may split one). In data, also characters JSON escapes (2 or 6 bytes).
OUTPUT_FILLS = ["y", "é", "€", "😀"]
CODE_FILLS = ["a", "é", "€", "😀"]
DATA_FILLS = ["a", "é", "€", "😀", "\n", "\x01", '"']

# NUL is refused in data (PostgreSQL text cannot hold it); anything else that UTF-8 can
# carry goes (a lone surrogate is not UTF-8, and the API's JSON parser refuses it).
TEXT = st.characters(codec="utf-8", exclude_characters="\x00")
# Any JSON value the API takes, kept small: the padding brings the data to its size.
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(TEXT, max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(TEXT, max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def json_size(value: Any) -> int:
    """Its size as the ledger measures it (ledger.domain.check_data)."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def padding(room: int, char: str, width: int) -> str:
    """`room` bytes of `char` (each `width` bytes), made up with ASCII."""
    assert room >= 0, room
    count = room // width
    return char * count + "a" * (room - count * width)


def data_of_size(size: int, value: Any, char: str) -> Any:
    data = {"value": value, "pad": ""}
    width = json_size(char) - 2  # without its quotes
    data["pad"] = padding(size - json_size(data), char, width)
    assert json_size(data) == size
    return data


PROGRAM = """\
import hashlib, json, sys
head = hashlib.sha256(
    json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
).hexdigest().encode() + b"\\n"
for stream, size, fill in ((sys.stdout, {out}, {out_fill!r}), (sys.stderr, {err}, {err_fill!r})):
    unit = fill.encode()
    stream.buffer.write((head + unit * (size // len(unit) + 1))[:size])
    stream.buffer.flush()
"""


def written(data: Any, size: int, fill: str) -> bytes:
    """What PROGRAM writes to a stream: the data's digest, then `fill`, `size` bytes."""
    head = hashlib.sha256(canonical(data)).hexdigest().encode() + b"\n"
    unit = fill.encode()
    return (head + unit * (size // len(unit) + 1))[:size]


def program(size: int, out: int, out_fill: str, err: int, err_fill: str, pad: str) -> str:
    """PROGRAM for these outputs, padded with a comment to exactly `size` UTF-8 bytes."""
    code = PROGRAM.format(out=out, out_fill=out_fill, err=err, err_fill=err_fill) + "#"
    return code + padding(size - len(code.encode()), pad, len(pad.encode()))


def decoded(raw: bytes) -> str:
    """The sandbox's text of a stream: its first OUTPUT_CAP bytes as UTF-8 (invalid UTF-8,
    such as a character cut at the cap, becomes U+FFFD, 3 bytes)."""
    return raw[:OUTPUT_CAP].decode("utf-8", errors="replace")


def kept(raw: bytes) -> str:
    """What the task's result holds of a stream: the ledger keeps at most OUTPUT_CAP bytes
    of the sandbox's text, cut on a character boundary (docs/ledger.md, "The payload
    budget")."""
    return decoded(raw).encode()[:OUTPUT_CAP].decode("utf-8", errors="ignore")


# -- one `taskledger dev` for the module ---------------------------------------------------


@dataclass
class Dev:
    url: str
    client: httpx.Client
    database_url: str  # its embedded PostgreSQL, to look behind the API

    def submit(self, task: dict[str, Any]) -> httpx.Response:
        # As compact UTF-8 JSON: the size the ledger checks is the data's own.
        body = json.dumps(task, separators=(",", ":"), ensure_ascii=False).encode()
        return self.client.post(
            "/api/tasks", content=body, headers={"Content-Type": "application/json"}
        )

    def finished(self, task_id: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            response = self.client.get(f"/api/tasks/{task_id}", params={"wait": 30})
            assert response.status_code == 200, response.text[:2000]
            task: dict[str, Any] = response.json()
            if task["status"] not in ("Pending", "InProgress"):
                return task
            assert time.monotonic() < deadline, f"still {task['status']} after {timeout} s"

    def history(self, task_id: str) -> list[dict[str, Any]]:
        response = self.client.get(f"/api/tasks/{task_id}/history")
        assert response.status_code == 200, response.text[:2000]
        items: list[dict[str, Any]] = response.json()["items"]
        return items

    def stored_events(self) -> int:
        with psycopg.connect(self.database_url) as conn:
            row = conn.execute("SELECT count(*) FROM taskledger_events").fetchone()
        assert row is not None
        return int(row[0])


def postmaster(pgdata: Path) -> tuple[int, str]:
    """The embedded server's pid and socket directory (postmaster.pid, lines 1 and 5)."""
    lines = (pgdata / "postmaster.pid").read_text().splitlines()
    return int(lines[0]), lines[4]


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dev]:
    """`taskledger dev` with no database URL, in a directory of its own."""
    home = tmp_path_factory.mktemp("dev-limits")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TASKLEDGER_")}
    env |= {
        "TASKLEDGER_DATA_DIR": str(home / "data"),
        "TASKLEDGER_LOG_DIR": str(home / "logs"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    }
    log = home / "dev.out"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "taskledger", "dev", "--port", str(port), "--concurrency", "4"],
            cwd=home,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    server_pid = None
    try:
        wait_until_serving(process, url, log, timeout=120)
        server_pid, socket_dir = postmaster(home / "data" / "postgres")
        key = (home / "data" / "dev-api-key").read_text().strip()
        with httpx.Client(
            base_url=url, headers={"Authorization": f"ApiKey {key}"}, timeout=120
        ) as client:
            yield Dev(url, client, f"postgresql://postgres@/postgres?host={quote(socket_dir)}")
    finally:
        stop(process)
        if server_pid is not None:
            try:
                psutil.Process(server_pid).wait(30)
            except psutil.NoSuchProcess:
                pass
            except psutil.TimeoutExpired:
                psutil.Process(server_pid).kill()
                raise AssertionError(
                    f"the embedded PostgreSQL (pid {server_pid}) outlived taskledger dev"
                ) from None
    assert process.returncode == 0, f"exit {process.returncode}:\n{log.read_text()[-5000:]}"


# -- at the limits: accepted, completed, read back whole -----------------------------------


def near(cap: int, below: int = 64) -> st.SearchStrategy[int]:
    return st.integers(cap - below, cap)


def around(cap: int) -> st.SearchStrategy[int]:
    """Output sizes on both sides of the cap, and well over it."""
    return st.integers(cap - 64, cap + 64) | st.sampled_from([cap - 1, cap, cap + 1, 2 * cap])


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    code_size=near(CODE_CAP),
    code_fill=st.sampled_from(CODE_FILLS),
    data_size=near(DATA_CAP),
    data_fill=st.sampled_from(DATA_FILLS),
    value=JSON_VALUES,
    out=around(OUTPUT_CAP),
    out_fill=st.sampled_from(OUTPUT_FILLS),
    err=around(OUTPUT_CAP),
    err_fill=st.sampled_from(OUTPUT_FILLS),
)
@example(CODE_CAP, "a", DATA_CAP, "a", None, OUTPUT_CAP, "y", OUTPUT_CAP, "y")
@example(CODE_CAP, "😀", DATA_CAP, "€", [1.5], OUTPUT_CAP + 1, "y", OUTPUT_CAP - 1, "😀")
@example(CODE_CAP, "é", DATA_CAP, "\x01", {"k": "v"}, OUTPUT_CAP + 1, "€", OUTPUT_CAP + 1, "é")
def test_a_task_at_its_limits_completes_and_reads_back_whole(
    dev: Dev,
    code_size: int,
    code_fill: str,
    data_size: int,
    data_fill: str,
    value: Any,
    out: int,
    out_fill: str,
    err: int,
    err_fill: str,
) -> None:
    code = program(code_size, out, out_fill, err, err_fill, code_fill)
    data = data_of_size(data_size, value, data_fill)
    assert len(code.encode()) == code_size
    response = dev.submit(
        {
            "description": "at the limits",
            "language": "python",
            "code": code,
            "data": data,
            "ttl_seconds": 120,
            "max_attempts": 1,
        }
    )
    assert response.status_code == 201, response.text[:2000]
    task = dev.finished(response.json()["id"])
    assert task["status"] == "Completed", (task["status"], task["error"])
    assert task["code"] == code
    assert task["data"] == data
    stdout, stderr = written(data, out, out_fill), written(data, err, err_fill)
    expected = {
        "stdout": kept(stdout),
        "stderr": kept(stderr),
        "exit_code": 0,
        # Cut by the sandbox (more bytes than the cap), or by the ledger (text that grew
        # past the cap as invalid UTF-8 became U+FFFD).
        "truncated": any(
            len(raw) > OUTPUT_CAP or len(kept(raw).encode()) < len(decoded(raw).encode())
            for raw in (stdout, stderr)
        ),
    }
    result = {k: v for k, v in task["result"].items() if k != "duration_ms"}
    assert result == expected, describe(result, expected)
    completed = dev.history(task["id"])[-1]
    assert completed["type"] == "AttemptCompleted"
    assert {k: completed["data"]["result"][k] for k in expected} == expected


def describe(result: dict[str, Any], expected: dict[str, Any]) -> str:
    """Where the result differs, without megabytes of output in the message."""
    lines = []
    for key, want in expected.items():
        got = result.get(key)
        if got == want:
            continue
        if isinstance(want, str) and isinstance(got, str):
            pairs = zip(got, want, strict=False)
            at = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(got), len(want)))
            window = slice(max(0, at - 20), at + 20)
            lines.append(
                f"{key}: {len(got)} characters, expected {len(want)}; first difference at {at}:"
                f" got {got[window]!r}, expected {want[window]!r}"
            )
        else:
            lines.append(f"{key}: {got!r}, expected {want!r}")
    return "\n".join(lines)


def test_tasks_at_their_limits_at_once_all_complete(dev: Dev) -> None:
    """Several outcomes of 2 MiB at once: the group commit takes them together (what
    wedged psycopg's pipeline mode, over a Unix socket from a few hundred KB)."""
    data = data_of_size(DATA_CAP, None, "a")
    code = program(CODE_CAP, OUTPUT_CAP + 1, "y", OUTPUT_CAP + 1, "e", "a")
    task = {"language": "python", "code": code, "data": data, "ttl_seconds": 120}
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(dev.submit, [task] * 8))
    assert [r.status_code for r in responses] == [201] * 8
    with ThreadPoolExecutor(8) as pool:
        tasks = list(pool.map(dev.finished, [r.json()["id"] for r in responses]))
    assert [t["status"] for t in tasks] == ["Completed"] * 8
    for done in tasks:
        assert done["result"]["stdout"] == kept(written(data, OUTPUT_CAP + 1, "y"))
        assert done["result"]["stderr"] == kept(written(data, OUTPUT_CAP + 1, "e"))
        assert done["result"]["truncated"] is True


def test_echo_returns_data_at_its_limit_whole(dev: Dev) -> None:
    data = data_of_size(DATA_CAP, {"list": [1, 2.5, None, True]}, "€")
    response = dev.submit({"language": "echo", "data": data, "ttl_seconds": 60})
    assert response.status_code == 201, response.text[:2000]
    task = dev.finished(response.json()["id"])
    assert task["status"] == "Completed"
    assert json.loads(task["result"]["stdout"]) == data
    assert task["result"]["truncated"] is False


# -- one byte over: refused, naming the field, nothing stored ------------------------------


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    field=st.sampled_from(["code", "data"]),
    over=st.integers(1, 64),
    fill=st.sampled_from(["a", "é", "€", "😀"]),
)
@example("code", 1, "a")
@example("data", 1, "a")
def test_code_or_data_over_its_limit_is_refused_naming_it(
    dev: Dev, field: str, over: int, fill: str
) -> None:
    code = program(CODE_CAP, 10, "y", 10, "y", "a")
    data = data_of_size(DATA_CAP, None, "a")
    if field == "code":
        code = program(CODE_CAP + over, 10, "y", 10, "y", fill)
    else:
        data = data_of_size(DATA_CAP + over, None, fill)
    before = dev.stored_events()
    response = dev.submit({"language": "python", "code": code, "data": data})
    assert response.status_code == 422, response.text[:2000]
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert [e["field"] for e in problem["errors"]] == [field], problem
    assert dev.stored_events() == before
