"""`taskledger api` over HTTPS, as an operator starts it: a real process on a free port, a
throwaway certificate authority (trustme), the certificate and key given by flags, by
variables or by the TOML file of --config."""

from __future__ import annotations

import os
import secrets
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import orjson
import pytest
import trustme

from tests.processes import free_port, stop

pytestmark = [pytest.mark.postgres]

KEY = "https-" + secrets.token_hex(16)


@dataclass
class Tls:
    ca: trustme.CA
    cert: Path
    key: Path

    def client(self) -> httpx.Client:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return httpx.Client(verify=context, timeout=10)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = folder / "server.pem", folder / "server.key"
    cert.write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    return Tls(ca, cert, key)


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    stdout: Path
    stderr: Path
    log_dir: Path

    def output(self) -> str:
        return f"stdout:\n{self.stdout.read_text()}\nstderr:\n{self.stderr.read_text()}"


def start_api(
    how: str, tls: Tls, database_url: str, schema: str, tmp_path: Path
) -> Iterator[Server]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TASKLEDGER_")}
    env |= {
        "TASKLEDGER_DATABASE_URL": database_url,
        "TASKLEDGER_DATABASE_SCHEMA": schema,
        "TASKLEDGER_BROKER_URL": "memory://",
        "TASKLEDGER_API_KEYS": f"acme:read:{KEY}",
        "TASKLEDGER_DATA_DIR": str(tmp_path / "data"),
        "TASKLEDGER_LOG_DIR": str(tmp_path / "logs"),
    }
    args = ["api", "--port", str(port)]
    if how == "flags":
        args += ["--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key)]
    elif how == "variables":
        env |= {"TASKLEDGER_SSL_CERTFILE": str(tls.cert), "TASKLEDGER_SSL_KEYFILE": str(tls.key)}
    else:
        config = tmp_path / "taskledger.toml"
        config.write_text(f'ssl_certfile = "{tls.cert}"\nssl_keyfile = "{tls.key}"\n')
        args = ["--config", str(config), *args]
    stdout, stderr = tmp_path / "api.out", tmp_path / "api.err"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "taskledger", *args], env=env, stdout=out, stderr=err
        )
    server = Server(process, f"https://127.0.0.1:{port}", stdout, stderr, tmp_path / "logs")
    try:
        wait_until_serving(server, tls, timeout=60)
        yield server
    finally:
        stop(process)


def wait_until_serving(server: Server, tls: Tls, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with tls.client() as client:
        while True:
            code = server.process.poll()
            if code is not None:
                raise AssertionError(f"taskledger api exited with {code}\n{server.output()}")
            try:
                if client.get(f"{server.url}/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"not serving after {timeout} s\n{server.output()}")
            time.sleep(0.1)


@pytest.fixture(params=["flags", "variables", "config file"])
def server(
    request: pytest.FixtureRequest, tls: Tls, database_url: str, schema: str, tmp_path: Path
) -> Iterator[Server]:
    yield from start_api(request.param, tls, database_url, schema, tmp_path)


@pytest.fixture
def flags_server(tls: Tls, database_url: str, schema: str, tmp_path: Path) -> Iterator[Server]:
    yield from start_api("flags", tls, database_url, schema, tmp_path)


def test_the_api_serves_https_with_the_configured_certificate(server: Server, tls: Tls) -> None:
    with tls.client() as client:
        health = client.get(f"{server.url}/healthz")
        assert health.status_code == 200, health.text
        stats = client.get(f"{server.url}/api/stats", headers={"Authorization": f"ApiKey {KEY}"})
        assert stats.status_code == 200, stats.text
        unauthenticated = client.get(f"{server.url}/api/stats")
        assert unauthenticated.status_code == 401
    # Only HTTPS: plain HTTP on the same port gets no answer, and a client that does not
    # trust the throwaway CA refuses the certificate.
    plain = server.url.replace("https://", "http://")
    try:
        status = httpx.get(f"{plain}/healthz", timeout=5).status_code
    except httpx.TransportError:
        status = None
    assert status != 200
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{server.url}/healthz", timeout=5)


def test_the_api_logs_json_lines_to_stdout_and_its_daily_file(
    flags_server: Server, tls: Tls
) -> None:
    server = flags_server
    with tls.client() as client:
        client.get(f"{server.url}/api/stats", headers={"Authorization": f"ApiKey {KEY}"})
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(20) == 0
    # Every line on stdout is a JSON object (parsing fails otherwise).
    stdout = [orjson.loads(line) for line in server.stdout.read_text().splitlines()]
    log_file = server.log_dir / f"api-{datetime.now(UTC):%Y-%m-%d}.log"
    in_file = [orjson.loads(line) for line in log_file.read_text().splitlines()]
    for lines in (stdout, in_file):
        serving = next(line for line in lines if line["msg"] == "serving the API")
        assert serving["url"] == server.url
        assert any(
            line["msg"] == "request" and line["path"] == "/api/stats" and line["status"] == 200
            for line in lines
        )
