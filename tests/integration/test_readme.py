"""README.md's first session, pasted as a new user pastes it, against a real `taskledger dev`.

The session is the README's own text: its two ```sh blocks under "A first session" (the
one that sets TL and KEY, then the one of curl commands) run in bash with `set -euo
pipefail`, so any command that fails (curl's --fail-with-body makes an HTTP error one)
fails the test. Only TL is set again after the first block, to the port this test's
process listens on; KEY is read from `.taskledger/dev-api-key` as the README says.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import services
from tests.processes import free_port, stop, wait_until_serving

pytestmark = [pytest.mark.postgres]

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SECTION = "## A first session"
SH_BLOCK = re.compile(r"^```sh\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def section(text: str, heading: str) -> str:
    """The text under `heading`, up to the next heading of the same level."""
    start = text.index(heading + "\n")
    following = text.find("\n## ", start + len(heading))
    return text[start : following if following != -1 else len(text)]


def session_blocks() -> tuple[str, str]:
    """The README's (setup, session) ```sh blocks of its first session."""
    blocks = SH_BLOCK.findall(section(README.read_text(), SECTION))
    assert len(blocks) == 2, f"{SECTION}: expected 2 ```sh blocks (setup, session): {blocks}"
    return blocks[0], blocks[1]


def commands(block: str) -> list[str]:
    """The block's lines that are not comments or blank."""
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_the_setup_block_sets_tl_and_key_only() -> None:
    """The test sets TL again after it; anything else there would go unchecked."""
    setup, _ = session_blocks()
    assigned = [re.match(r"^([A-Z]+)=", line) for line in commands(setup)]
    assert [m.group(1) if m else None for m in assigned] == ["TL", "KEY"], setup


def test_every_curl_line_of_the_readme_is_in_the_session() -> None:
    """A curl command shown anywhere else in the README would not be run here."""
    setup, session = session_blocks()
    shown = [line for block in SH_BLOCK.findall(README.read_text()) for line in block.splitlines()]
    with_curl = [line for line in shown if re.search(r"\bcurl\b", line)]
    assert with_curl
    run = (setup + session).splitlines()
    assert [line for line in with_curl if line not in run] == []


@pytest.fixture
def dev_url(database_url: str, schema: str, tmp_path: Path) -> Iterator[str]:
    """`taskledger dev` started in tmp_path as a user starts it, without a key configured,
    so it issues one into `.taskledger/dev-api-key` there."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TASKLEDGER_")}
    env |= {
        # A database of the test server rather than the embedded one: only the session
        # is under test, and the embedded PostgreSQL has a test of its own.
        "TASKLEDGER_DATABASE_URL": database_url,
        "TASKLEDGER_DATABASE_SCHEMA": schema,
        # It runs in tmp_path (for `.taskledger/` there); the code is still this tree's.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    }
    output = tmp_path / "dev.out"
    with output.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "taskledger", "dev", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(process, url, output, timeout=60)
        yield url
    finally:
        stop(process)


def json_documents(text: str) -> list[Any]:
    """The JSON documents printed one after another (what `python3 -m json.tool` prints)."""
    decoder = json.JSONDecoder()
    documents, index = [], 0
    while index < len(text):
        if text[index].isspace():
            index += 1
            continue
        document, index = decoder.raw_decode(text, index)
        documents.append(document)
    return documents


def test_the_first_session_runs_as_written(dev_url: str, tmp_path: Path) -> None:
    for tool in ("bash", "curl"):
        if shutil.which(tool) is None:
            services.unavailable(tool, f"no {tool} on PATH; the README's session needs it")
    setup, session = session_blocks()
    script = "\n".join(["set -euo pipefail", setup, f"TL={dev_url}", session])
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TASKLEDGER_")}
    # The session's python3 is the user's; here it is the one running the tests, so the
    # check does not depend on what else the machine has on PATH.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    ran = subprocess.run(
        ["bash", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    report = f"exit {ran.returncode}\nstdout:\n{ran.stdout}\nstderr:\n{ran.stderr}"
    assert ran.returncode == 0, report
    task, history = json_documents(ran.stdout)
    # What the README says the session shows.
    assert task["status"] == "Completed", report
    assert task["result"]["stdout"] == "6\n", report
    assert [item["type"] for item in history["items"]] == [
        "TaskSubmitted",
        "AttemptScheduled",
        "AttemptStarted",
        "AttemptCompleted",
    ], report
