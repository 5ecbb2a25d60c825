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
FROM python:3.11-slim-bookworm

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
# More slots than this on one host: the sandbox creates the rest at start, per container.
ARG SANDBOX_USERS=32
RUN useradd --system --uid 10001 --user-group --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin taskledger \
    && for n in $(seq 0 $((SANDBOX_USERS - 1))); do \
        useradd --system --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin --comment "taskledger sandbox slot" "tlsbx$n"; \
    done \
    && mkdir -p /var/lib/taskledger /var/log/taskledger /run/lock/taskledger-sandbox \
    && chown taskledger:taskledger /var/lib/taskledger /var/log/taskledger \
    && chmod 0700 /run/lock/taskledger-sandbox

WORKDIR /app

# Dependencies first, from pyproject.toml alone: this layer is rebuilt only when they change.
COPY pyproject.toml ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; open('/tmp/requirements.txt', 'w').write(chr(10).join(deps))" \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Then the source, and the package itself without dependencies (they are all there).
COPY . .
RUN pip install --no-deps . && rm -rf build ./*.egg-info

# Where the roles write: C# assembly cache (worker), log files (every role; also stdout).
ENV TASKLEDGER_DATA_DIR=/var/lib/taskledger \
    TASKLEDGER_LOG_DIR=/var/log/taskledger

USER taskledger
EXPOSE 8000

# The api's liveness (GET /healthz answers 200 without a key). For the plain-HTTP api on
# port 8000, the default command; compose replaces it for the workers.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["taskledger", "api", "--host", "0.0.0.0", "--port", "8000"]
