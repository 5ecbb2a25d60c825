"""Executors against real processes in the real sandbox (root here and in CI), isolated
(the zygote) and unisolated (spawned). tests/integration/test_sandbox_attacks.py attacks
the isolated one.

Containment tests assert on what the sandbox reported it could do: where it could not
(not root, no network namespace), they say so and skip.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from tests import services
from tests.sandboxing import describe, request
from workers.executors import build_executors, executors
from workers.executors.base import RunOutcome, RunRequest
from workers.executors.csharp import CSharpExecutor
from workers.executors.python import PythonExecutor
from workers.sandbox import Limits, Sandbox, uid_processes, zygote
from workers.sandbox.layers import MOUNT_NS, NETWORK_NS

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["isolated", "unisolated"])
async def sandbox(request: pytest.FixtureRequest) -> AsyncIterator[Sandbox]:
    """Every test runs twice: in the isolated sandbox (programs forked by the zygote into
    their namespaces), and spawned without isolation."""
    sandbox = Sandbox(2, isolate=request.param == "isolated")
    caps = await sandbox.start()
    if request.param == "isolated" and caps.root:
        assert caps.isolated, caps.layers
    yield sandbox
    await sandbox.close()


async def run(executor: PythonExecutor | CSharpExecutor, req: RunRequest) -> RunOutcome:
    return await executor.run(req, asyncio.Event())


def slot_processes(sandbox: Sandbox, slot: int = 0) -> list[int]:
    uid = sandbox.slot_uid(slot)
    assert uid is not None
    return uid_processes(uid)


async def buried(sandbox: Sandbox, slot: int = 0) -> None:
    """After a test that forks hundreds of processes: wait until the slot's dead are
    buried. Spawned programs' orphans go to pid 1, which may bury them late (seconds, on
    this machine), and until then they count against the slot's process limit: the next
    test's mono could not even start its threads ("Couldn't create thread")."""
    uid = sandbox.slot_uid(slot)
    assert uid is not None
    await wait_until(lambda: not uid_processes(uid, zombies=True), seconds=60)


async def wait_until(condition: Callable[[], bool], seconds: float = 15) -> None:
    """Poll a condition that no event announces (a process appearing in /proc)."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + seconds
    while not condition():
        assert loop.time() < give_up, "condition not reached"
        await asyncio.sleep(0.01)


needs_users = pytest.mark.skipif(os.geteuid() != 0, reason="slot users need root")


# -- Python: results and failures -------------------------------------------------------


async def test_completed_with_stdout_stderr_and_duration(python: PythonExecutor) -> None:
    outcome = await run(
        python, request("import sys\nprint('hello')\nprint('warn', file=sys.stderr)")
    )
    assert outcome.kind == "completed"
    assert outcome.result is not None
    assert outcome.result.stdout == "hello\n"
    assert outcome.result.stderr == "warn\n"
    assert outcome.result.exit_code == 0
    assert outcome.result.duration_ms > 0
    assert not outcome.result.truncated


async def test_data_arrives_on_stdin_and_as_a_global(python: PythonExecutor) -> None:
    code = "import json, sys\nprint(json.dumps([json.load(sys.stdin), data]))"
    data = {"n": 3, "s": "é", "l": [1, None, True]}
    outcome = await run(python, request(code, data))
    assert outcome.result is not None
    assert json.loads(outcome.result.stdout) == [data, data]


async def test_uncaught_exception_is_a_retryable_program_error(python: PythonExecutor) -> None:
    code = "def f():\n    raise ValueError('boom')\nf()"
    outcome = await run(python, request(code))
    assert outcome.kind == "failed"
    assert outcome.retryable
    assert outcome.error is not None
    assert outcome.error.kind == "program_error"
    assert outcome.error.message == "ValueError: boom"
    assert outcome.error.exit_code == 1
    assert 'File "main.py", line 2, in f' in outcome.error.stderr
    assert "raise ValueError('boom')" in outcome.error.stderr  # the program's source line


async def test_nonzero_exit_is_a_program_error(python: PythonExecutor) -> None:
    outcome = await run(python, request("import sys\nprint('bye')\nsys.exit(3)"))
    assert outcome.kind == "failed"
    assert outcome.retryable
    assert outcome.error is not None
    assert (outcome.error.kind, outcome.error.message, outcome.error.exit_code) == (
        "program_error",
        "exit status 3",
        3,
    )


async def test_syntax_error_is_a_permanent_compile_error(python: PythonExecutor) -> None:
    outcome = await run(python, request("print('ok')\ndef (:\n"))
    assert outcome.kind == "failed"
    assert not outcome.retryable
    assert outcome.error is not None
    assert outcome.error.kind == "compile_error"
    assert outcome.error.message.startswith("SyntaxError")
    assert 'File "main.py", line 2' in outcome.error.stderr


async def test_code_too_large_or_not_utf8_is_invalid(python: PythonExecutor) -> None:
    too_large = "x = 1\n" * (python.sandbox.limits.code_bytes // 6 + 1)
    for code in (too_large, "print('\ud800')"):
        outcome = await run(python, request(code))
        assert outcome.kind == "failed"
        assert not outcome.retryable
        assert outcome.error is not None
        assert outcome.error.kind == "invalid_code"


async def test_output_over_the_cap_is_truncated(python: PythonExecutor) -> None:
    cap = python.sandbox.limits.output_bytes
    code = f"import sys\nsys.stdout.write('x' * {3 * cap})\nsys.stderr.write('e' * {2 * cap})"
    outcome = await run(python, request(code))
    assert outcome.kind == "completed"
    assert outcome.result is not None
    assert outcome.result.truncated
    assert outcome.result.stdout == "x" * cap
    assert outcome.result.stderr == "e" * cap


async def test_slots_run_at_once_apart(python: PythonExecutor) -> None:
    # Apart: another user (root) or another directory (spawned without root).
    code = "import os\nprint(os.getuid(), os.path.realpath(os.environ['HOME']))"
    first, second = await asyncio.gather(
        run(python, request(code, slot=0)), run(python, request(code, slot=1))
    )
    assert first.result is not None
    assert second.result is not None
    assert first.result.stdout != second.result.stdout


async def test_each_run_has_its_own_directory_removed_afterwards(python: PythonExecutor) -> None:
    code = (
        "import os\nprint(sorted(os.listdir('.')))\n"
        "open('left.txt', 'w').write('x')\nprint(os.getcwd(), os.environ['HOME'])"
    )
    outcome = await run(python, request(code))
    assert outcome.result is not None
    listing, where = outcome.result.stdout.splitlines()
    assert listing == "[]"  # a fresh directory
    cwd, home = where.split()
    assert cwd == home
    sandbox = python.sandbox
    if sandbox.capabilities.isolated:
        assert cwd == "/task"
    else:
        assert Path(cwd).parent.parent == sandbox.work_dir
        assert not Path(cwd).exists()
    # Nothing of the run is left on the host.
    runs = sandbox.work_dir / (
        sandbox.capabilities.users[0].name if sandbox.capabilities.root else ""
    )
    assert not any(path.name.startswith("run-") for path in runs.rglob("run-*"))


@pytest.mark.parametrize(
    ("code", "signal_name"),
    [
        (
            "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\nimport time\ntime.sleep(60)",
            "SIGTERM",
        ),
        ("import signal, time\nsignal.alarm(1)\ntime.sleep(60)", "SIGALRM"),
        (
            "import os, signal, time\n"
            "if os.fork() == 0:\n    os.kill(os.getppid(), signal.SIGUSR1)\n    os._exit(0)\n"
            "time.sleep(60)",
            "SIGUSR1",
        ),
    ],
)
async def test_a_signal_ends_the_program_as_it_would_anywhere(
    python: PythonExecutor, code: str, signal_name: str
) -> None:
    # In the isolated sandbox a Python program is pid 1 of its namespace, which the kernel
    # shields from signals it does not handle: the sandbox handles them as the default would.
    outcome = await run(python, request(code, seconds=30))
    assert outcome.kind == "failed", describe(outcome)
    assert outcome.error is not None
    assert outcome.error.message == f"killed by {signal_name}"
    assert outcome.error.exit_code == -signal.Signals[signal_name]


# -- deadlines and cancellation ---------------------------------------------------------


@needs_users
async def test_busy_loop_expires_at_its_deadline_and_dies(python: PythonExecutor) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    outcome = await run(python, request("while True: pass", seconds=1))
    assert outcome.kind == "expired"
    assert loop.time() - started < 5  # liveness bound: 1 s deadline plus generous margin
    assert slot_processes(python.sandbox) == []


async def test_deadline_already_passed_runs_nothing(python: PythonExecutor) -> None:
    outcome = await run(python, request("print('never')", seconds=-1))
    assert outcome.kind == "expired"


@needs_users
async def test_cancel_kills_the_program(python: PythonExecutor) -> None:
    cancelled = asyncio.Event()
    running = asyncio.ensure_future(python.run(request("import time\ntime.sleep(600)"), cancelled))
    await wait_until(lambda: bool(slot_processes(python.sandbox)))
    cancelled.set()
    outcome = await asyncio.wait_for(running, 10)
    assert outcome.kind == "cancelled"
    assert slot_processes(python.sandbox) == []


DOUBLE_FORK = """
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        null = os.open('/dev/null', os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        while True:
            time.sleep(1)
    os._exit(0)
os.wait()
print('daemon started')
"""


@needs_users
async def test_a_daemon_left_behind_is_killed_when_the_run_ends(python: PythonExecutor) -> None:
    outcome = await run(python, request(DOUBLE_FORK))
    assert outcome.kind == "completed"
    assert slot_processes(python.sandbox) == []


@needs_users
async def test_a_daemon_dies_with_the_deadline(python: PythonExecutor) -> None:
    outcome = await run(python, request(DOUBLE_FORK + "while True: pass\n", seconds=1.5))
    assert outcome.kind == "expired"
    assert slot_processes(python.sandbox) == []


# -- containment --------------------------------------------------------------------------


@needs_users
async def test_runs_as_the_slot_user_without_groups(python: PythonExecutor) -> None:
    outcome = await run(python, request("import os\nprint(os.getuid(), os.getgroups())", slot=1))
    assert outcome.result is not None
    assert outcome.result.stdout == f"{python.sandbox.slot_uid(1)} []\n"


async def test_no_network(python: PythonExecutor) -> None:
    caps = python.sandbox.capabilities
    if not caps.active(NETWORK_NS):
        pytest.skip(f"the sandbox reported no network isolation here: {caps.layers}")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        code = (
            "import socket\n"
            f"for port in ({port}, 5432):\n"
            "    try:\n"
            "        socket.create_connection(('127.0.0.1', port), timeout=2).close()\n"
            "        print('connected', port)\n"
            "    except OSError as e:\n"
            "        print('refused', port, e)\n"
        )
        outcome = await run(python, request(code))
    assert outcome.result is not None
    assert "connected" not in outcome.result.stdout
    assert outcome.result.stdout.count("refused") == 2


async def test_the_workers_environment_does_not_leak(
    python: PythonExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASKLEDGER_SANDBOX_TEST_SECRET", "hunter2-secret")
    outcome = await run(python, request("import json, os\nprint(json.dumps(dict(os.environ)))"))
    assert outcome.result is not None
    env = json.loads(outcome.result.stdout)
    assert set(env) == {"PATH", "HOME", "LANG", "TMPDIR"}
    assert env["LANG"] == "C.UTF-8"
    assert "hunter2-secret" not in outcome.result.stdout


async def test_unbounded_allocation_fails_at_the_memory_limit(python: PythonExecutor) -> None:
    code = "chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 1024 * 1024))"
    outcome = await run(python, request(code))
    assert outcome.kind == "failed"
    assert not outcome.retryable
    assert outcome.error is not None
    assert outcome.error.kind == "memory_limit", describe(outcome)
    assert "512 MiB" in outcome.error.message


async def test_a_huge_file_is_stopped(python: PythonExecutor) -> None:
    limit = python.sandbox.limits.file_size_bytes
    code = (
        "import os\n"
        "with open('big', 'wb') as f:\n"
        "    for _ in range(64):\n"
        f"        f.write(b'x' * {limit // 8})\n"
    )
    outcome = await run(python, request(code))
    assert outcome.kind == "failed"
    assert outcome.error is not None
    assert outcome.error.kind == "disk_full", describe(outcome)
    assert "MiB" in outcome.error.message


@needs_users
async def test_process_count_is_limited_per_slot(python: PythonExecutor) -> None:
    code = (
        "import os, time\n"
        "count = 0\n"
        "for _ in range(500):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError:\n"
        "        break\n"
        "    if pid == 0:\n"
        "        time.sleep(600)\n"
        "        os._exit(0)\n"
        "    count += 1\n"
        "print(count)\n"
    )
    outcome = await run(python, request(code))
    assert outcome.result is not None
    assert int(outcome.result.stdout) < python.sandbox.limits.processes
    assert slot_processes(python.sandbox) == []
    await buried(python.sandbox)


@needs_users
@pytest.mark.slow
async def test_a_fork_bomb_is_contained(python: PythonExecutor) -> None:
    code = (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    )
    outcome = await run(python, request(code, seconds=2))
    assert outcome.kind == "expired"
    assert slot_processes(python.sandbox) == []
    # The worker (this test process) and the slot are still fine.
    after = await run(python, request("print('alive')"))
    assert after.result is not None
    assert after.result.stdout == "alive\n"
    await buried(python.sandbox)


@pytest.mark.slow
async def test_cpu_time_limit(tmp_path: Path) -> None:
    sandbox = Sandbox(1, Limits(cpu_seconds=1), work_dir=tmp_path / "work")
    await sandbox.start()
    try:
        outcome = await run(PythonExecutor(sandbox), request("while True: pass", seconds=30))
    finally:
        await sandbox.close()
    assert outcome.kind == "failed"
    assert outcome.error is not None
    assert outcome.error.kind == "cpu", describe(outcome)
    assert outcome.error.message == "the run used its 1 s of CPU time"


@needs_users
async def test_when_the_zygote_dies_runs_fail_retryably_and_a_new_one_serves(
    tmp_path: Path,
) -> None:
    sandbox = Sandbox(1, work_dir=tmp_path / "work")
    assert (await sandbox.start()).isolated
    python = PythonExecutor(sandbox)
    try:
        sleeper = request("import time\ntime.sleep(600)")
        running = asyncio.ensure_future(python.run(sleeper, asyncio.Event()))
        await wait_until(lambda: bool(slot_processes(sandbox)))
        first = sandbox._zygotes.serving[0]
        assert first is not None
        first.kill_now()
        outcome = await asyncio.wait_for(running, 15)
        assert outcome.kind == "failed"
        assert outcome.retryable
        assert outcome.error is not None
        assert outcome.error.kind == "sandbox_error"
        assert slot_processes(sandbox) == []
        after = await run(python, request("import os\nprint(os.getpid())"))
        assert after.result is not None
        assert after.result.stdout == "1\n"  # pid 1 of its own namespace: isolated
        assert sandbox._zygotes.serving[0] is not first
    finally:
        await sandbox.close()


@needs_users
async def test_a_zygote_that_cannot_start_means_refusing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "child"
    broken.mkdir()
    (broken / "zygote.py").write_text("raise SystemExit('broken zygote')\n")
    monkeypatch.setattr(zygote, "CHILD_DIR", broken)
    sandbox = Sandbox(1, work_dir=tmp_path / "work")
    try:
        caps = await sandbox.start()
        assert not caps.isolated
        assert not caps.active(MOUNT_NS)
        assert caps.refusal is not None
        outcome = await run(PythonExecutor(sandbox), request("print('never')"))
        assert outcome.kind == "failed"
        assert not outcome.retryable
        assert outcome.error is not None
        assert outcome.error.kind == "sandbox_unavailable"
        assert "mount namespace" in outcome.error.message
        assert "allow_unisolated" in outcome.error.message
    finally:
        await sandbox.close()
    allowed = Sandbox(1, work_dir=tmp_path / "work", allow_unisolated=True)
    try:
        caps = await allowed.start()
        assert caps.refusal is None
        outcome = await run(PythonExecutor(allowed), request("print('spawned')"))
        assert outcome.result is not None
        assert outcome.result.stdout == "spawned\n"
    finally:
        await allowed.close()


async def test_built_executors_start_their_sandbox_on_first_use(tmp_path: Path) -> None:
    registry = build_executors(1, tmp_path)
    try:
        outcome = await registry["python"].run(request("print(data)", [1]), asyncio.Event())
        assert outcome.result is not None
        assert outcome.result.stdout == "[1]\n"
    finally:
        for executor in registry.values():
            await executor.close()


async def test_registry_has_every_language(sandbox: Sandbox, tmp_path: Path) -> None:
    registry = executors(sandbox, tmp_path / "csharp")
    assert set(registry) == {"python", "csharp", "echo"}
    outcome = await registry["echo"].run(request("", {"a": [1]}), asyncio.Event())
    assert outcome.result is not None
    assert json.loads(outcome.result.stdout) == {"a": [1]}


# -- C# -------------------------------------------------------------------------------------


HELLO = """
using System;
class Program {
    static void Main() {
        Console.WriteLine("hello " + Console.In.ReadToEnd());
    }
}
"""


async def test_csharp_hello_with_data_on_stdin_and_cache(csharp: CSharpExecutor) -> None:
    outcome = await run(csharp, request(HELLO, {"who": "mono"}))
    assert outcome.kind == "completed", describe(outcome)
    assert outcome.result is not None
    assert outcome.result.stdout == 'hello {"who":"mono"}\n'
    assembly = csharp.cache_dir / f"{hashlib.sha256(HELLO.encode()).hexdigest()}.exe"
    assert assembly.is_file()
    assert csharp.compilations == 1
    again = await run(csharp, request(HELLO, [1, 2], slot=1))
    assert again.result is not None
    assert again.result.stdout == "hello [1,2]\n"
    assert csharp.compilations == 1  # the second run did not invoke mcs


async def test_csharp_compile_error_is_permanent(csharp: CSharpExecutor) -> None:
    outcome = await run(csharp, request('class P { static void Main() { int x = "a"; } }'))
    assert outcome.kind == "failed"
    assert not outcome.retryable, describe(outcome)
    assert outcome.error is not None
    assert outcome.error.kind == "compile_error"
    assert "error CS0029" in outcome.error.message
    assert not any(csharp.cache_dir.iterdir())


async def test_csharp_compile_time_limit(sandbox: Sandbox, tmp_path: Path) -> None:
    executor = CSharpExecutor(sandbox, tmp_path / "cache", compile_seconds=0.01)
    if not executor.available:
        services.unavailable("Mono", "mcs or mono not found")
    outcome = await run(executor, request(HELLO))  # mcs alone starts in ~0.1 s
    assert outcome.kind == "failed"
    assert not outcome.retryable
    assert outcome.error is not None
    assert outcome.error.kind == "compile_error"
    assert outcome.error.message == "compilation took longer than 0.01 s"


async def test_csharp_unhandled_exception_is_a_program_error(csharp: CSharpExecutor) -> None:
    code = 'class P { static void Main() { throw new System.InvalidOperationException("boom"); } }'
    outcome = await run(csharp, request(code))
    assert outcome.kind == "failed"
    assert outcome.retryable
    assert outcome.error is not None
    assert outcome.error.kind == "program_error"
    assert outcome.error.message == "System.InvalidOperationException: boom"


async def test_csharp_code_too_large_is_invalid(csharp: CSharpExecutor) -> None:
    code = "//" + "x" * csharp.sandbox.limits.code_bytes
    outcome = await run(csharp, request(code))
    assert outcome.error is not None
    assert (outcome.kind, outcome.error.kind, outcome.retryable) == (
        "failed",
        "invalid_code",
        False,
    )
    assert csharp.compilations == 0


@needs_users
@pytest.mark.slow
async def test_csharp_busy_loop_expires(csharp: CSharpExecutor) -> None:
    code = "class P { static void Main() { while (true) {} } }"
    outcome = await run(csharp, request(code, seconds=5))
    assert outcome.kind == "expired"
    assert slot_processes(csharp.sandbox) == []


async def test_csharp_without_mono_fails_at_once(sandbox: Sandbox, tmp_path: Path) -> None:
    executor = CSharpExecutor(sandbox, tmp_path, mcs="/nonexistent/mcs", mono="/nonexistent/mono")
    outcome = await run(executor, request(HELLO))
    assert outcome.kind == "failed"
    assert not outcome.retryable
    assert outcome.error is not None
    assert outcome.error.kind == "language_unavailable"
    assert "mono-mcs" in outcome.error.message
    assert "mono-runtime" in outcome.error.message
