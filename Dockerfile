# One image for every role of taskledger; the role is the command:
#
#   docker run IMAGE                                         # taskledger api (the default)
#   docker run IMAGE taskledger worker --concurrency 4       # a worker (see "root" below)
#   docker run IMAGE taskledger projections status           # any other subcommand
#
# Configuration comes from TASKLEDGER_* environment variables only (docs/operations.md;
# docker-compose.yml is a complete example). This image has never been built on the
# development machines (they have no Docker engine); tests/unit/test_deploy_files.py
# checks it against the CLI and the settings instead.
#
# Root or not:
# - Every role except the worker runs as the unprivileged user `taskledger` (USER below).
# - The worker runs as root inside its container (compose: `user: root`), with every
#   capability dropped but those its sandbox (workers/sandbox/, docs/sandbox.md) uses to
#   give each run its own world; programs themselves never run as root (each slot has its
#   own unprivileged user, tlsbx0, tlsbx1, ..., and no_new_privs):
#     SETUID, SETGID   switch a run to its slot user;
#     CHOWN            hand a run its directory;
#     DAC_OVERRIDE     remove that directory afterwards (the slot user's, mode 0700);
#     KILL             kill what a slot left behind (another uid);
#     SYS_ADMIN        the run's namespaces (mount, PID, IPC, UTS, network: unshare and
#                      setns), its mounts (tmpfs, /proc, binds, pivot_root), and a
#                      cgroup2 mount of its own (the container's /sys/fs/cgroup is
#                      read-only) for the per-slot memory, pids and cpu cgroups; Docker's
#                      default seccomp profile allows these calls only with it;
#     SYS_CHROOT       enter a slot's mount namespace (setns requires it).
#   Docker's default AppArmor profile denies mount(2) whatever the capabilities: the
#   worker runs with apparmor=unconfined (compose: security_opt), in its own cgroup
#   namespace (compose: cgroup: private) so that its cgroup2 mount is rooted at the
#   container's own cgroup. Check what a container got with
#   `docker compose run --rm worker taskledger worker --check-sandbox`: a worker missing a
#   layer refuses python and csharp tasks (sandbox_unavailable) unless
#   TASKLEDGER_SANDBOX__ALLOW_UNISOLATED=true. None of this has been run in a container
#   yet (the development machines have no container engine).
#
# The base image is named by tag; to pin it (reproducible builds), pass its digest, looked
# up once where a registry is reachable (docs/operations.md, "Pinning the base image"):
#   docker buildx imagetools inspect python:3.11-slim-bookworm     # "Digest: sha256:..."
#   docker build --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<digest> .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# The package as a wheel, built apart: the final image holds no copy of the source tree
# (one in its working directory would shadow the installed package for `python -m`).
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
COPY . /src
RUN pip wheel --no-deps --wheel-dir /wheels /src

FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# - mono-mcs, mono-runtime: the C# executor (mcs compiles, mono runs); without them C# tasks
#   fail as language_unavailable. Same packages as scripts/_services.sh installs.
# - util-linux (unshare for the layer check, mount for the cgroup2 mount, setpriv and
#   prlimit for the unisolated fallback; Essential in Debian, named to be explicit),
#   procps (kill, to kill a slot's user in one step) and libseccomp2 (the seccomp filter
#   is compiled with it).
# - tini: pid 1 that passes SIGTERM on (a worker drains its running attempts) and buries
#   orphans (in spawn mode a slot's unburied zombies count against its process limit).
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        libseccomp2 mono-mcs mono-runtime procps tini util-linux \
    && rm -rf /var/lib/apt/lists/*

# The runtime user, and the sandbox's slot users made now, in a fixed order, so that they
# have the same uids in every container of this image: workers on one host that share
# /run/lock/taskledger-sandbox (compose mounts one volume there) claim different users,
# and so never share a uid (a slot's process limit counts per uid on the whole host).
# Explicit high ids, clear of the system range (the postgres and rabbitmq images run as
# 999); the slot users also above login.defs' UID_MAX (60000), where useradd never picks
# an id by itself (see workers/sandbox/users.py):
#   taskledger                  uid and gid 10001
#   tlsbx<n>, n = 0 .. 31       uid and gid SANDBOX_UID_BASE + n: 70000 .. 70031
# (useradd warns that these are outside UID_MIN..UID_MAX: that is the point.) More slots
# than SANDBOX_USERS on one host: the sandbox creates the rest at start, per container,
# with the same numbering.
ARG SANDBOX_USERS=32
ARG SANDBOX_UID_BASE=70000
RUN groupadd --gid 10001 taskledger \
    && useradd --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin taskledger \
    && for n in $(seq 0 $((SANDBOX_USERS - 1))); do \
        groupadd --gid $((SANDBOX_UID_BASE + n)) "tlsbx$n" \
        && useradd --uid $((SANDBOX_UID_BASE + n)) --gid $((SANDBOX_UID_BASE + n)) \
            --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin --comment "taskledger sandbox slot" "tlsbx$n"; \
    done \
    && mkdir -p /var/lib/taskledger /var/log/taskledger /run/lock/taskledger-sandbox \
    && chown taskledger:taskledger /var/lib/taskledger /var/log/taskledger \
    && chmod 0700 /run/lock/taskledger-sandbox

# The working directory holds no Python package (see the build stage above).
WORKDIR /var/lib/taskledger

# Dependencies first, from pyproject.toml alone: this layer is rebuilt only when they change.
# At the versions constraints.txt pins, as scripts/test and scripts/dev install them.
COPY pyproject.toml constraints.txt /tmp/
RUN python -c "import tomllib; deps = tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']; open('/tmp/requirements.txt', 'w').write(chr(10).join(deps))" \
    && pip install -c /tmp/constraints.txt -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt /tmp/pyproject.toml /tmp/constraints.txt

# Then the package itself, from the build stage's wheel, without dependencies (they are
# all there).
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels

# Where the roles write: C# assembly cache (worker), log files (every role; also stdout).
# Where the api listens, and a worker's metrics port (its health check asks it); flags
# (`taskledger api --port 8443`) and these variables move them, and the health check with them.
ENV TASKLEDGER_DATA_DIR=/var/lib/taskledger \
    TASKLEDGER_LOG_DIR=/var/log/taskledger \
    TASKLEDGER_HOST=0.0.0.0 \
    TASKLEDGER_PORT=8000 \
    TASKLEDGER_METRICS_PORT=9100

USER taskledger
EXPOSE 8000

# Liveness, of whichever role the container runs (taskledger/healthcheck.py reads the
# command from pid 1 and the settings as that role does): the api's GET /healthz on its
# port, https:// when TASKLEDGER_SSL_CERTFILE is set; a worker's /metrics on its metrics
# port. Roles that serve nothing (`projections run`) count as healthy while they run.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "taskledger.healthcheck"]

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["taskledger", "api"]
