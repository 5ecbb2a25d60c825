"""The deployment files (Dockerfile, .dockerignore, docker-compose.yml) against the code.

No Docker engine runs where the tests run, so nothing here builds an image or starts a
container. The checks are structural (the compose file is compose-shaped YAML, the
Dockerfile has the layers the operations issue asks for) and against the code: every
`taskledger` command and flag they use parses with the real CLI, every TASKLEDGER_*
variable they name is a real setting, and each service's environment loads as settings.
"""

from __future__ import annotations

import fnmatch
import http.server
import json
import os
import re
import shlex
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from api.auth import parse_configured_keys
from taskledger import settings as settings_module
from taskledger.cli import _parser
from taskledger.healthcheck import container_command, probe_url
from taskledger.healthcheck import main as healthcheck_main
from taskledger.loading import load_settings
from taskledger.settings import ConfigError, Settings
from workers.sandbox.users import USER_PREFIX

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_DEBUG = ROOT / "docker-compose.debug.yml"
README = ROOT / "README.md"
OPERATIONS = ROOT / "docs" / "operations.md"

# The compose specification's top-level and service keys (those a typo would most likely
# turn a real key into something compose ignores or refuses).
TOP_LEVEL_KEYS = {"version", "name", "services", "volumes", "networks", "configs", "secrets"}
SERVICE_KEYS = {
    "build", "cap_add", "cap_drop", "cgroup", "command", "configs", "container_name", "cpus",
    "depends_on", "deploy", "devices", "entrypoint", "env_file", "environment", "expose",
    "extra_hosts", "healthcheck", "hostname", "image", "init", "labels", "logging",
    "mem_limit", "networks", "pids_limit", "platform", "ports", "privileged", "profiles",
    "pull_policy", "read_only", "restart", "secrets", "security_opt", "shm_size",
    "stop_grace_period", "stop_signal", "sysctls", "tmpfs", "ulimits", "user", "volumes",
    "working_dir",
}  # fmt: skip
HEALTHCHECK_KEYS = {"test", "interval", "timeout", "retries", "start_period", "disable"}
DEPENDENCY_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
RESTART_POLICIES = {"no", "always", "on-failure", "unless-stopped"}
CAPABILITIES = {
    "ALL", "AUDIT_CONTROL", "AUDIT_READ", "AUDIT_WRITE", "BLOCK_SUSPEND", "BPF",
    "CHECKPOINT_RESTORE", "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID",
    "IPC_LOCK", "IPC_OWNER", "KILL", "LEASE", "LINUX_IMMUTABLE", "MAC_ADMIN",
    "MAC_OVERRIDE", "MKNOD", "NET_ADMIN", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_RAW",
    "PERFMON", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_ADMIN", "SYS_BOOT",
    "SYS_CHROOT", "SYS_MODULE", "SYS_NICE", "SYS_PACCT", "SYS_PTRACE", "SYS_RAWIO",
    "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "SYSLOG", "WAKE_ALARM",
}  # fmt: skip
# What the worker's sandbox does as root: switch to the slot users (SETUID, SETGID), give
# them their run directory (CHOWN) and clean it (DAC_OVERRIDE), kill what a slot left
# (KILL), make each run's namespaces, mounts and cgroups (SYS_ADMIN) and enter a slot's
# mount namespace (SYS_CHROOT).
SANDBOX_CAPABILITIES = {
    "CHOWN", "DAC_OVERRIDE", "KILL", "SETUID", "SETGID", "SYS_ADMIN", "SYS_CHROOT"
}  # fmt: skip
DURATION = re.compile(r"^(\d+(\.\d+)?(us|ms|s|m|h))+$")
INTERPOLATION = re.compile(
    r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))"
)
VARIABLE = re.compile(r"\bTASKLEDGER_[A-Z0-9_]+")


# -- reading the files ------------------------------------------------------------------------


def interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` interpolation, with an empty environment: what `docker
    compose up` uses when neither the shell nor a .env file sets the variable."""

    def substitute(match: re.Match[str]) -> str:
        escaped, name, operator, argument, bare = match.groups()
        if escaped:
            return "$"
        if bare or operator is None:
            raise AssertionError(f"${{{name or bare}}} has no default: compose would use ''")
        if operator in ("-", ":-"):
            return str(argument)
        raise AssertionError(f"${{{name}{operator}...}} needs the variable set")

    return INTERPOLATION.sub(substitute, value)


def interpolated(node: Any) -> Any:
    if isinstance(node, str):
        return interpolate(node)
    if isinstance(node, list):
        return [interpolated(item) for item in node]
    if isinstance(node, dict):
        return {key: interpolated(value) for key, value in node.items()}
    return node


def load_compose(path: Path = COMPOSE) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(document, dict), f"{path.name} is not a YAML mapping"
    return dict(interpolated(document))


def services() -> dict[str, dict[str, Any]]:
    found = load_compose()["services"]
    assert isinstance(found, dict)
    return found


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str

    def exec_form(self) -> list[str]:
        """The JSON array of an exec-form CMD/ENTRYPOINT/HEALTHCHECK CMD."""
        text = self.arguments
        if self.keyword == "HEALTHCHECK":
            text = text[text.index("CMD") + len("CMD") :]
        parsed = json.loads(text)
        assert isinstance(parsed, list), f"{self.keyword} is not in exec form: {self.arguments}"
        return [str(item) for item in parsed]


def dockerfile() -> list[Instruction]:
    """The instructions, continuation lines joined, comments dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def build_args() -> dict[str, str]:
    """The ARG instructions' defaults (what a build without --build-arg uses)."""
    found: dict[str, str] = {}
    for instruction in dockerfile():
        if instruction.keyword == "ARG":
            name, _, default = instruction.arguments.partition("=")
            found[name] = default
    return found


def stages() -> list[list[Instruction]]:
    """The build stages: each FROM and the instructions after it, in order."""
    found: list[list[Instruction]] = []
    for instruction in dockerfile():
        if instruction.keyword == "FROM":
            found.append([])
        if found:
            found[-1].append(instruction)
    assert found, "the Dockerfile has no FROM"
    return found


def base_image(stage: list[Instruction]) -> str:
    """The stage's FROM image, its ${ARG}s replaced by their defaults."""
    image = stage[0].arguments.split()[0]
    return re.sub(r"\$\{(\w+)\}", lambda m: build_args()[m.group(1)], image)


def image_environment() -> dict[str, str]:
    """The variables the image's ENV instructions set."""
    found: dict[str, str] = {}
    for instruction in stages()[-1]:
        if instruction.keyword != "ENV":
            continue
        words = shlex.split(instruction.arguments)
        if "=" not in words[0]:  # the legacy `ENV NAME value` form
            found[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            name, _, value = word.partition("=")
            found[name] = value
    return found


def command_of(service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    if command is None:
        return default_command()
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def default_command() -> list[str]:
    (cmd,) = [i for i in dockerfile() if i.keyword == "CMD"][-1:]
    return cmd.exec_form()


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    """The service's environment as its container sees it: the image's ENV, then compose's."""
    given = service.get("environment") or {}
    if isinstance(given, list):
        given = dict(entry.partition("=")[::2] for entry in given)
    return {**image_environment(), **{str(k): str(v) for k, v in given.items()}}


def taskledger_services() -> dict[str, dict[str, Any]]:
    """The services that run the image of ./Dockerfile (the ones compose builds)."""
    ours = {name: service for name, service in services().items() if "build" in service}
    for name, service in ours.items():
        assert command_of(service)[:1] == ["taskledger"], f"service {name}: not a taskledger role"
    return ours


def role_of(service: dict[str, Any]) -> str:
    return command_of(service)[1]


def replicas(service: dict[str, Any]) -> int:
    return int((service.get("deploy") or {}).get("replicas", 1))


def parse_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> Any:
    """The real CLI's parse of `argv` (after `taskledger`); fails the test with its error."""
    try:
        return _parser().parse_args(argv)
    except SystemExit:
        error = capsys.readouterr().err.strip().splitlines()
        pytest.fail(f"`taskledger {shlex.join(argv)}` does not parse: {error[-1:]}")


def real_variables() -> set[str]:
    names = {f"{settings_module.ENV_PREFIX}{field.upper()}" for field in Settings.model_fields}
    for section in getattr(settings_module, "SECTIONS", ()):  # TASKLEDGER_SANDBOX__PIDS, …
        model = Settings.model_fields[section].annotation
        assert isinstance(model, type)
        names |= {settings_module.env_name(f"{section}.{key}") for key in model.model_fields}
    config_variable = getattr(settings_module, "CONFIG_VARIABLE", None)
    return names | ({config_variable} if config_variable else set())


def healthcheck_command(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return test if isinstance(test, str) else " ".join(str(part) for part in test)


PROBE = ["python", "-m", "taskledger.healthcheck"]


def probed_url(check: list[str], command: list[str], environment: dict[str, str]) -> str | None:
    """What the health check `check` (exec form, without CMD) asks in a container that runs
    `command` with `environment`: taskledger/healthcheck.py's own answer."""
    assert check[: len(PROBE)] == PROBE, f"not the image's health check: {check}"
    argv = check[len(PROBE) :] or container_command(
        b"\0".join(word.encode() for word in ["/usr/bin/tini", "--", *command]) + b"\0"
    )
    assert argv is not None, f"no taskledger command in {command}"
    saved = {k: v for k, v in os.environ.items() if k.startswith("TASKLEDGER_")}
    try:
        for name in saved:
            del os.environ[name]
        os.environ.update(environment)
        return probe_url(argv)
    finally:
        for name in environment:
            os.environ.pop(name, None)
        os.environ.update(saved)


def service_probe(service: dict[str, Any]) -> str | None:
    test = [str(part) for part in service["healthcheck"]["test"]]
    assert test[0] == "CMD", f"the health check is not in exec form: {test}"
    return probed_url(test[1:], command_of(service), environment_of(service))


def local_port(url: str | None) -> int:
    match = re.search(r"//127\.0\.0\.1:(\d+)/", url or "")
    assert match, f"{url}: not a URL of 127.0.0.1 with a port"
    return int(match.group(1))


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.upper().startswith("TASKLEDGER_"):
            monkeypatch.delenv(name)
    return monkeypatch


# -- docker-compose.yml: compose-shaped ---------------------------------------------------------


def test_compose_has_only_compose_keys() -> None:
    document = load_compose()
    unknown = {k for k in document if not k.startswith("x-")} - TOP_LEVEL_KEYS
    assert not unknown, f"not compose top-level keys: {unknown}"
    assert services(), "no services"
    for name, service in services().items():
        assert isinstance(service, dict), name
        unknown = set(service) - SERVICE_KEYS
        assert not unknown, f"service {name}: not compose service keys: {unknown}"
        assert "image" in service or "build" in service, f"service {name}: no image or build"
        if "restart" in service:
            assert service["restart"] in RESTART_POLICIES, name
        if "stop_grace_period" in service:
            assert DURATION.match(str(service["stop_grace_period"])), name


def test_compose_healthchecks_are_well_formed() -> None:
    for name, service in services().items():
        check = service.get("healthcheck")
        if check is None:
            continue
        assert set(check) <= HEALTHCHECK_KEYS, f"service {name}: {set(check) - HEALTHCHECK_KEYS}"
        test = check["test"]
        if isinstance(test, list):
            assert test[0] in ("CMD", "CMD-SHELL", "NONE"), f"service {name}: {test}"
            assert len(test) > 1, f"service {name}: an empty health check"
        else:
            assert isinstance(test, str), name
            assert test, name
        for key in ("interval", "timeout", "start_period"):
            if key in check:
                assert DURATION.match(str(check[key])), f"service {name}: {key}={check[key]}"
        assert int(check.get("retries", 1)) >= 1, name


def test_compose_dependencies_name_services_with_real_conditions() -> None:
    every = services()
    for name, service in every.items():
        depends = service.get("depends_on") or {}
        if isinstance(depends, list):
            depends = {other: {"condition": "service_started"} for other in depends}
        for other, how in depends.items():
            assert other in every, f"service {name} depends on an unknown service {other}"
            condition = (how or {}).get("condition", "service_started")
            assert condition in DEPENDENCY_CONDITIONS, f"service {name}: {condition}"
            if condition == "service_healthy":
                assert "healthcheck" in every[other], f"{other} has no health check to wait for"


def test_compose_named_volumes_are_declared() -> None:
    declared = set(load_compose().get("volumes") or {})
    used = set()
    for name, service in services().items():
        for volume in service.get("volumes") or []:
            if isinstance(volume, dict):
                source, target = str(volume.get("source", "")), str(volume["target"])
                is_named = volume.get("type", "volume") == "volume"
            else:
                source, _, rest = str(volume).partition(":")
                target = rest.partition(":")[0]
                is_named = not source.startswith((".", "/", "~"))
            assert target.startswith("/"), f"service {name}: mount target {target!r}"
            if is_named:
                assert source in declared, f"service {name}: volume {source!r} is not declared"
                used.add(source)
    assert used == declared, f"declared but unused volumes: {declared - used}"


def test_compose_ports_and_capabilities_are_well_formed() -> None:
    port = re.compile(r"^((\d{1,3}\.){3}\d{1,3}:)?(\d+:)?\d+(/(tcp|udp))?$")
    for name, service in services().items():
        for mapping in service.get("ports") or []:
            assert port.match(str(mapping)), f"service {name}: port {mapping!r}"
        for key in ("cap_add", "cap_drop"):
            unknown = set(service.get(key) or []) - CAPABILITIES
            assert not unknown, f"service {name}: {key} has unknown capabilities {unknown}"


def test_compose_interpolations_have_defaults() -> None:
    """`docker compose up -d` works without a .env file (interpolate() refuses otherwise)."""
    raw = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    interpolated(raw)


# -- docker-compose.yml: what the operations issue asks for ----------------------------------


def test_compose_runs_postgres_rabbitmq_an_api_and_two_workers() -> None:
    every = services()
    postgres = next(s for s in every.values() if str(s.get("image")).startswith("postgres:"))
    assert postgres["image"] == "postgres:16"
    assert "pg_isready" in healthcheck_command(postgres)
    rabbitmq = next(s for s in every.values() if str(s.get("image")).startswith("rabbitmq:"))
    assert rabbitmq["image"] == "rabbitmq:3-management"
    assert "rabbitmq-diagnostics -q ping" in healthcheck_command(rabbitmq)
    debug = load_compose(COMPOSE_DEBUG)["services"]
    assert "127.0.0.1:15672:15672" in debug["rabbitmq"]["ports"], "management UI (debug)"
    for service in (postgres, rabbitmq):
        assert any(":" in str(v) and not str(v).startswith((".", "/")) for v in service["volumes"])

    ours = taskledger_services()
    roles = [role for s in ours.values() for role in [role_of(s)] * replicas(s)]
    assert roles.count("api") == 1, roles
    assert roles.count("worker") == 2, roles
    images = {(str(s.get("build")), str(s.get("image"))) for s in ours.values()}
    assert len(images) == 1, f"one image for every role: {images}"
    postgres_name = next(n for n, s in every.items() if s is postgres)
    rabbitmq_name = next(n for n, s in every.items() if s is rabbitmq)
    for name, service in ours.items():
        depends = service["depends_on"]
        for dependency in (postgres_name, rabbitmq_name):
            assert depends[dependency]["condition"] == "service_healthy", (name, dependency)
        assert "healthcheck" in service, f"service {name} has no health check"


def test_every_taskledger_command_parses_with_the_real_cli(
    capsys: pytest.CaptureFixture[str],
) -> None:
    commands = {"Dockerfile CMD": default_command()}
    commands |= {f"service {n}": command_of(s) for n, s in taskledger_services().items()}
    assert commands["Dockerfile CMD"][:2] == ["taskledger", "api"]
    for where, command in commands.items():
        args = parse_cli(command[1:], capsys)
        assert args.command in ("api", "worker"), f"{where}: {command}"


def test_the_api_listens_where_it_is_published_and_checked(
    capsys: pytest.CaptureFixture[str], clean_environment: pytest.MonkeyPatch
) -> None:
    for name, service in taskledger_services().items():
        if role_of(service) != "api":
            continue
        args = parse_cli(command_of(service)[1:], capsys)
        for key, value in environment_of(service).items():
            clean_environment.setenv(key, value)
        settings = load_settings()
        host = args.host or getattr(settings, "host", None)
        port = args.port or getattr(settings, "port", None)
        everywhere = "0.0.0.0"  # noqa: S104 - the API inside its container
        assert host == everywhere, f"service {name}: the API must listen on every interface"
        assert any(str(p).endswith(f":{port}") for p in service["ports"]), (name, port)
        assert service_probe(service) == f"http://127.0.0.1:{port}/healthz", name


def test_the_worker_health_check_asks_its_metrics_port(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, service in taskledger_services().items():
        if role_of(service) != "worker":
            continue
        args = parse_cli(command_of(service)[1:], capsys)
        port = getattr(args, "metrics_port", None) or environment_of(service).get(
            "TASKLEDGER_METRICS_PORT"
        )
        assert port, f"service {name}: no metrics port for its health check to ask"
        assert service_probe(service) == f"http://127.0.0.1:{port}/metrics", name
        bound = float(environment_of(service).get("TASKLEDGER_SHUTDOWN_SECONDS", "10"))
        assert args.grace is None or float(args.grace) < bound, (
            f"service {name}: --grace {args.grace} must be less than its shutdown bound {bound}"
        )


def test_docker_waits_longer_than_each_role_takes_to_stop() -> None:
    """Docker's SIGKILL comes after the role's own bound (TASKLEDGER_SHUTDOWN_SECONDS), so
    a role always gets to stop in order, or to say why it could not."""
    for name, service in taskledger_services().items():
        bound = float(environment_of(service).get("TASKLEDGER_SHUTDOWN_SECONDS", "10"))
        stop = str(service.get("stop_grace_period", "10s"))  # Docker's default
        assert stop.endswith("s"), f"service {name}: stop_grace_period {stop} in seconds"
        assert float(stop[:-1]) > bound, (
            f"service {name}: stop_grace_period {stop} must outlast its shutdown bound {bound}"
        )


def test_every_taskledger_variable_is_a_setting() -> None:
    real = real_variables()
    for path in (DOCKERFILE, COMPOSE, OPERATIONS):
        named = set(VARIABLE.findall(path.read_text(encoding="utf-8")))
        assert named, f"{path.name} names no TASKLEDGER_* variable"
        unknown = named - real
        assert not unknown, f"{path.name}: {sorted(unknown)} are not settings ({sorted(real)})"
    for name, service in taskledger_services().items():
        unknown = {k for k in environment_of(service) if k.startswith("TASKLEDGER_")} - real
        assert not unknown, f"service {name}: {unknown} are not settings"


def test_each_service_environment_loads_as_settings(
    clean_environment: pytest.MonkeyPatch,
) -> None:
    every = services()
    postgres = next(s for s in every.values() if str(s.get("image")).startswith("postgres:"))
    rabbitmq = next(s for s in every.values() if str(s.get("image")).startswith("rabbitmq:"))
    for name, service in taskledger_services().items():
        environment = environment_of(service)
        for key, value in environment.items():
            clean_environment.setenv(key, value)
        try:
            settings = load_settings()
        except ConfigError as error:
            pytest.fail(f"service {name}: {error}")
        finally:
            for key in environment:
                clean_environment.delenv(key)

        database = urlsplit(settings.database_url or "")
        assert database.hostname in every, f"service {name}: database host {database.hostname}"
        assert database.username == postgres["environment"]["POSTGRES_USER"]
        assert database.password == postgres["environment"]["POSTGRES_PASSWORD"]
        assert database.path == "/" + postgres["environment"]["POSTGRES_DB"]
        broker = urlsplit(settings.broker_url)
        assert broker.scheme == "amqp", f"service {name}: a separate process needs amqp://"
        assert broker.hostname in every, f"service {name}: broker host {broker.hostname}"
        assert broker.username == rabbitmq["environment"]["RABBITMQ_DEFAULT_USER"]
        assert broker.password == rabbitmq["environment"]["RABBITMQ_DEFAULT_PASS"]
        assert str(settings.log_dir).startswith("/"), f"service {name}: log dir in the image"

        if role_of(service) == "api":
            # The README's curl session submits a task: it needs a submit or admin key.
            assert settings.api_keys is not None, f"service {name}: no API key to curl with"
            keys = parse_configured_keys(settings.api_keys.get_secret_value())
            assert any(key.role in ("submit", "admin") for key in keys), keys


def test_workers_run_as_root_with_only_the_sandbox_capabilities_and_api_does_not() -> None:
    for name, service in taskledger_services().items():
        if role_of(service) == "worker":
            assert str(service.get("user")) in ("root", "0"), f"service {name}: sandbox needs root"
            assert service.get("cap_drop") == ["ALL"], f"service {name}: drop the rest"
            assert set(service.get("cap_add") or []) == SANDBOX_CAPABILITIES, name
            assert not service.get("privileged"), name
            # Mounts for each run's namespaces (AppArmor's docker-default denies them) and
            # a cgroup2 rooted at the container's own cgroup.
            assert "apparmor=unconfined" in (service.get("security_opt") or []), name
            assert service.get("cgroup") == "private", name
            mounts = [str(v).partition(":")[2] for v in service.get("volumes") or []]
            assert "/run/lock/taskledger-sandbox" in mounts, (
                f"service {name}: replicas must share the slot users' locks"
            )
        else:
            assert str(service.get("user", "")) not in ("root", "0"), f"service {name}"
            assert not service.get("cap_add"), f"service {name} needs no capability"


# -- Dockerfile and .dockerignore -----------------------------------------------------------


def test_dockerfile_layers() -> None:
    assert {base_image(stage) for stage in stages()} == {"python:3.11-slim-bookworm"}
    instructions = stages()[-1]  # the image; the stages before it only build the wheel
    keywords = [i.keyword for i in instructions]

    users = [i.arguments for i in instructions if i.keyword == "USER"]
    assert users, "no USER: the image would run as root"
    assert users[-1] not in ("root", "0"), "the image must end as a non-root user"

    healthchecks = [i for i in instructions if i.keyword == "HEALTHCHECK"]
    assert len(healthchecks) == 1
    assert healthchecks[0].exec_form() == PROBE, "the image's health check (see below)"
    assert "CMD" in keywords

    def index(predicate: Any, what: str) -> int:
        found = [n for n, i in enumerate(instructions) if predicate(i)]
        assert found, f"the Dockerfile has no {what}"
        return int(found[0])

    copy_project = index(
        lambda i: i.keyword == "COPY" and "pyproject.toml" in i.arguments, "COPY pyproject.toml"
    )
    install_deps = index(
        lambda i: i.keyword == "RUN" and re.search(r"pip install .*-r ", i.arguments),
        "RUN pip install -r",
    )
    # The pinned versions (issue 13: builds were not reproducible), as the scripts install.
    assert "-c /tmp/constraints.txt" in instructions[install_deps].arguments
    copy_wheel = index(
        lambda i: i.keyword == "COPY" and i.arguments.startswith("--from="), "COPY --from="
    )
    install_package = index(
        lambda i: i.keyword == "RUN" and "pip install --no-deps" in i.arguments,
        "RUN pip install --no-deps",
    )
    assert copy_project < install_deps < copy_wheel < install_package, (
        "dependencies must be installed from pyproject.toml before the package"
    )


def test_dockerfile_installs_what_the_worker_needs() -> None:
    runs = " ".join(i.arguments for i in dockerfile() if i.keyword == "RUN")
    for package in ("mono-mcs", "mono-runtime", "util-linux", "procps", "tini", "libseccomp2"):
        assert re.search(rf"apt-get install[^&]*\b{package}\b", runs), package
    # The slot users, made in the image so that they have the same uids in every container.
    assert f'"{USER_PREFIX}$n"' in runs
    assert "/run/lock/taskledger-sandbox" in runs
    entrypoint = [i for i in dockerfile() if i.keyword == "ENTRYPOINT"]
    assert entrypoint, "no ENTRYPOINT"
    assert entrypoint[-1].exec_form()[0].endswith("tini"), "pid 1 buries orphans"


def test_the_image_health_check_follows_the_role_its_port_and_its_scheme(
    tmp_path: Path,
) -> None:
    """Issue 13: the check was http://127.0.0.1:8000 whatever the port, the scheme and the
    role. It now asks what the container's command serves, configured as that command is."""
    (healthcheck,) = [i for i in stages()[-1] if i.keyword == "HEALTHCHECK"]
    check = healthcheck.exec_form()
    image = image_environment()
    (exposed,) = [i.arguments for i in stages()[-1] if i.keyword == "EXPOSE"]
    assert image["TASKLEDGER_PORT"] == exposed, "the api listens where the image says"
    tls = {
        "TASKLEDGER_SSL_CERTFILE": str(tmp_path / "server.pem"),
        "TASKLEDGER_SSL_KEYFILE": str(tmp_path / "server.key"),
    }
    cases: list[tuple[list[str], dict[str, str], str | None]] = [
        (default_command(), {}, f"http://127.0.0.1:{exposed}/healthz"),
        (default_command(), {"TASKLEDGER_PORT": "9000"}, "http://127.0.0.1:9000/healthz"),
        (default_command(), {"TASKLEDGER_PORT": "8443", **tls}, "https://127.0.0.1:8443/healthz"),
        (["taskledger", "api", "--port", "8001"], {}, "http://127.0.0.1:8001/healthz"),
        (["taskledger", "api", "--host", "10.1.2.3"], {}, f"http://10.1.2.3:{exposed}/healthz"),
        # `docker run IMAGE taskledger worker`: the image's metrics port, or the configured one.
        (["taskledger", "worker"], {}, "http://127.0.0.1:9100/metrics"),
        (["taskledger", "worker"], {"TASKLEDGER_METRICS_PORT": "9200"}, "http://127.0.0.1:9200/metrics"),
        (["taskledger", "worker", "--metrics-port", "9300"], {}, "http://127.0.0.1:9300/metrics"),
        (["taskledger", "projections", "run"], {}, None),
    ]  # fmt: skip
    for command, environment, expected in cases:
        got = probed_url(check, command, {**image, **environment})
        assert got == expected, (command, environment)
    # Given arguments, the check asks about them instead of pid 1's command.
    assert probed_url([*check, "worker"], default_command(), image) == (
        "http://127.0.0.1:9100/metrics"
    )


def test_the_health_check_asks_and_answers_as_docker_expects(
    clean_environment: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit 0 when the URL answers 200, 1 with the reason when nothing listens."""

    class Healthz(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Healthz)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = str(server.server_address[1])
        assert healthcheck_main(["api", "--port", port]) == 0
        clean_environment.setenv("TASKLEDGER_METRICS_PORT", port)
        assert healthcheck_main(["worker"]) == 1, "404 for /metrics is not healthy"
    finally:
        server.shutdown()
        server.server_close()
    assert healthcheck_main(["api", "--port", port]) == 1
    assert f"http://127.0.0.1:{port}/healthz" in capsys.readouterr().err
    assert healthcheck_main(["projections", "run"]) == 0


def test_the_health_check_finds_the_command_of_pid_1() -> None:
    def cmdline(*words: str) -> bytes:
        return b"".join(word.encode() + b"\0" for word in words)

    assert container_command(cmdline("/usr/bin/tini", "--", "taskledger", "api")) == ["api"]
    assert container_command(
        cmdline("/sbin/docker-init", "--", "/usr/bin/tini", "--", "taskledger", "worker")
    ) == ["worker"]
    assert container_command(
        cmdline("/usr/local/bin/python", "/usr/local/bin/taskledger", "worker", "--grace", "3")
    ) == ["worker", "--grace", "3"]
    assert container_command(cmdline("python", "-m", "taskledger", "api")) == ["api"]
    assert container_command(cmdline("/bin/sh")) is None


def ids_made(run: str) -> dict[str, list[int]]:
    """The uids and gids that a RUN's useradd and groupadd give, its loop over the slot
    users unrolled with the ARG defaults (`$((SANDBOX_UID_BASE + n))` for n in 0..N-1)."""
    args = build_args()
    loop = re.search(r"for n in \$\(seq 0 \$\(\(SANDBOX_USERS - 1\)\)\); do(.*?)done", run)
    assert loop, "no loop over the slot users"
    # useradd --uid: a user's uid; groupadd --gid: a group's gid; useradd --gid: the
    # user's primary group (given explicitly, or useradd would make one with a system gid).
    found: dict[str, list[int]] = {"uid": [], "gid": [], "primary": []}
    wanted = {"useradd": {"uid": "uid", "gid": "primary"}, "groupadd": {"gid": "gid"}}
    ns_of = (
        (run.replace(loop.group(0), ""), [0]),
        (loop.group(1), range(int(args["SANDBOX_USERS"]))),
    )
    for body, ns in ns_of:
        for program, command in re.findall(r"\b(useradd|groupadd)\b([^;&]*)", body):
            given = dict(re.findall(r"--(uid|gid) (\$\(\(\w+ \+ n\)\)|\S+)", command))
            assert set(given) == set(wanted[program]), f"{program}{command}: give {wanted}"
            for option, value in given.items():
                arithmetic = re.fullmatch(r"\$\(\((\w+) \+ n\)\)", value)
                assert arithmetic or value.isdigit(), f"{value}: not a number or BASE + n"
                for n in ns:
                    number = int(args[arithmetic.group(1)]) + n if arithmetic else int(value)
                    found[wanted[program][option]].append(number)
    return found


def test_the_image_gives_its_users_high_fixed_ids_as_the_docs_say() -> None:
    """Issue 13: the slot users got system uids 999 down to 968 (the postgres and rabbitmq
    images run as 999, and a host's 998 may be systemd-network), the taskledger group 999."""
    runs = [i.arguments for i in stages()[-1] if i.keyword == "RUN" and "useradd" in i.arguments]
    assert len(runs) == 1, "the users are made in one RUN"
    ids = ids_made(runs[0])
    users = int(build_args()["SANDBOX_USERS"])
    assert len(ids["uid"]) == len(ids["gid"]) == 1 + users, ids
    assert ids["primary"] == ids["gid"], "each user in its own group, made just before it"
    for kind, numbers in ids.items():
        low = [n for n in numbers if n < 10000]
        assert not low, f"{kind}s below 10000: {low}"
        assert len(set(numbers)) == len(numbers), f"{kind}s given twice: {numbers}"
    base = int(build_args()["SANDBOX_UID_BASE"])
    assert ids["uid"][:1] == ids["gid"][:1] == [10001], "taskledger is the first, 10001"
    assert sorted(ids["uid"][1:]) == list(range(base, base + users))

    operations = OPERATIONS.read_text(encoding="utf-8")
    dockerfile_text = DOCKERFILE.read_text(encoding="utf-8")
    for text in (operations, dockerfile_text):
        assert re.search(r"uid and gid\W+10001", text), "the taskledger user's ids"
        assert re.search(rf"\b{base}\D{{1,4}}{base + users - 1}\b", text), "the slot users' ids"
    assert f"`{USER_PREFIX}0`" in operations
    assert f"SANDBOX_UID_BASE={base}" in operations


def test_the_image_holds_no_source_tree_beside_the_installed_package() -> None:
    """Issue 13: `COPY . .` left the source in /app, the working directory, where it shadowed
    the installed package for `python -m`. The image gets the package as a wheel only."""
    *builders, image = stages()
    workdirs = [i.arguments for i in image if i.keyword == "WORKDIR"]
    assert workdirs, "no WORKDIR: the image's would be /"
    for instruction in image:
        if instruction.keyword not in ("COPY", "ADD"):
            continue
        words = [w for w in instruction.arguments.split() if not w.startswith("--")]
        *sources, target = words
        if "--from=" in instruction.arguments:
            assert builders, "COPY --from= without a build stage"
            assert all("wheel" in s for s in sources), f"only wheels: {instruction.arguments}"
        else:
            assert set(sources) <= {"pyproject.toml", "constraints.txt"}, (
                f"the image copies {sources} from the context"
            )
        assert not target.startswith(workdirs[-1]), f"{target} is in the working directory"
        assert target.startswith("/"), f"{target} is relative to the working directory"
        # Into a directory (a trailing /): each file copied must go again.
        left = (
            [target + s.rsplit("/", 1)[-1] for s in sources] if target.endswith("/") else [target]
        )
        for path in left:
            removed = [
                i
                for i in image
                if i.keyword == "RUN" and re.search(rf"\brm [^&;]*{re.escape(path)}\b", i.arguments)
            ]
            assert removed, f"{path} is left in the image"
    assert any("pip wheel" in i.arguments for stage in builders for i in stage)


def test_the_base_image_pinning_is_documented_without_a_made_up_digest() -> None:
    operations = OPERATIONS.read_text(encoding="utf-8")
    dockerfile_text = DOCKERFILE.read_text(encoding="utf-8")
    for text in (operations, dockerfile_text):
        assert "python:3.11-slim-bookworm@sha256:" in text
        assert "docker buildx imagetools inspect python:3.11-slim-bookworm" in text
    assert "podman inspect" in operations
    for text in (operations, dockerfile_text):
        digests = re.findall(r"sha256:([0-9a-f]{8,})", text)
        assert not digests, f"a digest nobody looked up: {digests}"


def test_only_the_api_is_published_and_dev_ports_stay_on_loopback() -> None:
    """Issue 13: the management UI was published on every interface with the demo password,
    PostgreSQL and AMQP on 127.0.0.1 (failing where they already run). Now only the API's
    port is published; the others are in docker-compose.debug.yml, on 127.0.0.1 only."""
    for name, service in services().items():
        ports = [str(p) for p in service.get("ports") or []]
        if name in taskledger_services() and role_of(service) == "api":
            assert ports, f"service {name}: the API is not published"
        else:
            assert not ports, f"service {name} publishes {ports}: only the API is published"
    debug = load_compose(COMPOSE_DEBUG)
    assert set(debug) == {"services"}, "the debug file only adds ports"
    published = {}
    for name, service in debug["services"].items():
        assert name in services(), f"docker-compose.debug.yml: no service {name} to extend"
        assert set(service) == {"ports"}, f"docker-compose.debug.yml: {name} changes {set(service)}"
        for mapping in service["ports"]:
            host, _, container = str(mapping).rpartition(":")
            assert host.startswith("127.0.0.1:"), f"{name}: {mapping} is not on 127.0.0.1"
            published[int(container)] = name
    assert published == {5432: "postgres", 5672: "rabbitmq", 15672: "rabbitmq"}
    assert ignored("docker-compose.debug.yml", dockerignore_patterns()), "not in the image"
    for path in (OPERATIONS, README):
        assert "docker-compose.debug.yml" in path.read_text(encoding="utf-8"), path.name


def dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert not [p for p in patterns if p.startswith("!")], "negations are not checked here"
    return patterns


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether the build context leaves out `path` (or a folder above it)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    return any(
        fnmatch.fnmatchcase(prefix, pattern.removeprefix("**/"))
        or fnmatch.fnmatchcase(prefix, pattern)
        for pattern in patterns
        for prefix in prefixes
    )


def test_dockerignore_keeps_the_package_and_leaves_out_the_rest() -> None:
    patterns = dockerignore_patterns()
    for path in (".venv", ".git", "tests", "logs", ".taskledger", "bench/results/x.json",
                 ".mypy_cache", "taskledger.egg-info"):  # fmt: skip
        assert ignored(path, patterns), f".dockerignore does not leave out {path}"
    # What `pip install .` needs: the project file, its readme, the packages.
    needed = ["pyproject.toml", "README.md", "ledger/domain.py", "projections/runner.py",
              "api/app.py", "workers/sandbox/sandbox.py", "workers/sandbox/child/zygote.py",
              "taskledger/cli.py"]  # fmt: skip
    for path in needed:
        assert (ROOT / path).exists(), path
        assert not ignored(path, patterns), f".dockerignore leaves out {path}"


def test_the_checks_catch_a_misspelling(
    clean_environment: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The checks above fail on a misspelled variable or flag (guarding the guard)."""
    assert "TASKLEDGER_BROKER_UR" not in real_variables()
    assert "TASKLEDGER_DATABASE_URL" in real_variables()
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        parse_cli(["worker", "--concurency", "2"], capsys)
    with pytest.raises(AssertionError, match="no default"):
        interpolate("${POSTGRES_PASSWORD}")
    clean_environment.setenv("TASKLEDGER_BROKER_URL", "kafka://broker")
    with pytest.raises(ConfigError, match="TASKLEDGER_BROKER_URL"):
        load_settings()
