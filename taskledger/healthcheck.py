"""The image's health check: `python -m taskledger.healthcheck [ARGS...]`.

It asks the process the container runs where that process answers, configured as that
process configured itself: the API's `GET /healthz` on its port (`--port`,
TASKLEDGER_PORT, the --config file), over HTTPS when it has a certificate
(TASKLEDGER_SSL_CERTFILE); a worker's Prometheus endpoint on its metrics port
(`--metrics-port`, TASKLEDGER_METRICS_PORT). Which process, and with which flags: ARGS (a
`taskledger` command line without `taskledger`, e.g. `worker --metrics-port 9100`), or
else the container's own command, read from pid 1 (tini, and `taskledger ...` after it).

Exit 0 when healthy or when the process serves nothing to ask (a worker without a metrics
port, `projections run`, a shell); 1 otherwise, with the reason on stderr (Docker keeps it
in `docker inspect`). The command runs as the container's user, with its environment.
"""

from __future__ import annotations

import ssl
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from taskledger.cli import _parser
from taskledger.commands import serve_flags
from taskledger.loading import load_settings
from taskledger.settings import ConfigError

TIMEOUT_SECONDS = 3.0  # within the HEALTHCHECK's --timeout=5s, with the imports' time
EVERY_INTERFACE = "0.0.0.0"  # noqa: S104 - an address to translate, not one we bind


def probe_url(argv: Sequence[str]) -> str | None:
    """The URL that answers while `taskledger ARGV` is alive, or None if it serves none."""
    args = _parser().parse_args(list(argv))
    if args.command in ("api", "dev"):
        settings = load_settings(serve_flags(args), config_file=args.config)
        scheme = "https" if settings.ssl_certfile is not None else "http"
        host = "127.0.0.1" if settings.host == EVERY_INTERFACE else settings.host
        return f"{scheme}://{host}:{settings.port}/healthz"
    if args.command == "worker" and not args.check_sandbox:
        settings = load_settings({"metrics_port": args.metrics_port}, config_file=args.config)
        if settings.metrics_port is not None:
            return f"http://127.0.0.1:{settings.metrics_port}/metrics"
    return None


def container_command(cmdline: bytes) -> list[str] | None:
    """The `taskledger` arguments in a /proc/PID/cmdline (`tini -- taskledger api ...`,
    `python /usr/local/bin/taskledger worker`, `python -m taskledger api`), or None."""
    words = [word.decode(errors="replace") for word in cmdline.split(b"\0") if word]
    for n, word in enumerate(words):
        if Path(word).name == "taskledger":
            return words[n + 1 :]
        if word == "-m" and words[n + 1 : n + 2] == ["taskledger"]:
            return words[n + 2 :]
    return None


def check(url: str) -> None:
    """Raise unless `url` answers 200 within TIMEOUT_SECONDS."""
    context = None
    if url.startswith("https://"):
        # The certificate names the service, not 127.0.0.1, and may be signed by a CA
        # this image does not hold: whether the process answers is all this asks.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS, context=context) as answer:  # noqa: S310 - http(s) only, built above
        if answer.status != 200:
            raise OSError(f"{url} answered {answer.status}")


def main(argv: Sequence[str]) -> int:
    if not argv:
        found = container_command(Path("/proc/1/cmdline").read_bytes())
        if found is None:
            print("healthcheck: pid 1 is not taskledger: nothing to ask", file=sys.stderr)
            return 0
        argv = found
    try:
        url = probe_url(argv)
    except (ConfigError, SystemExit) as error:
        print(f"healthcheck: taskledger {' '.join(argv)}: {error}", file=sys.stderr)
        return 1
    if url is None:
        print(f"healthcheck: taskledger {' '.join(argv)} serves nothing to ask", file=sys.stderr)
        return 0
    try:
        check(url)
    except OSError as error:  # URLError, timeouts and refused connections are OSErrors
        print(f"healthcheck: {url}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
