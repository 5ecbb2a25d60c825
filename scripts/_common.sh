# shellcheck shell=bash
# Shared helpers for scripts/dev, scripts/test and .ci/run. Source it; do not run it.
#
#   TL_ROOT              the repository root (set here)
#   tl_say / tl_warn / tl_die / tl_banner   messages on stderr
#   tl_find_python       prints a python >= 3.11 (TASKLEDGER_PYTHON overrides the search)
#   tl_ensure_venv EXTRA creates .venv if needed, `pip install -e .[EXTRA]` when
#                        pyproject.toml changed since the last install; sets TL_PYTHON

TL_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TL_VENV="$TL_ROOT/.venv"
TL_PYTHON="$TL_VENV/bin/python"
TL_STAMP="$TL_VENV/.taskledger-install-stamp"

tl_say() { printf '[taskledger] %s\n' "$*" >&2; }
tl_warn() { printf '[taskledger] WARNING: %s\n' "$*" >&2; }
tl_die() {
    printf '[taskledger] ERROR: %s\n' "$*" >&2
    exit 1
}
tl_banner() {
    local line='!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!'
    {
        printf '\n%s\n' "$line"
        local text
        for text in "$@"; do printf '!!! %s\n' "$text"; done
        printf '%s\n\n' "$line"
    } >&2
}

tl_in_ci() {
    case "${CI:-}" in
        1 | true | TRUE | True | yes | YES) return 0 ;;
        *) return 1 ;;
    esac
}

tl_is_root() { [ "$(id -u)" -eq 0 ]; }
tl_have() { command -v "$1" >/dev/null 2>&1; }
tl_can_apt() { tl_is_root && tl_have apt-get; }

TL_APT_UPDATED=0
# tl_apt_install PACKAGE...: apt-get install, refreshing the package lists once first.
tl_apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    if [ "$TL_APT_UPDATED" -eq 0 ]; then
        tl_say "apt-get update"
        apt-get update -qq || tl_warn "apt-get update failed; trying the install anyway"
        TL_APT_UPDATED=1
    fi
    tl_say "apt-get install -y $*"
    apt-get install -y -qq --no-install-recommends "$@"
}

# True when the interpreter $1 runs and is Python >= 3.11.
tl_python_ok() {
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1
}

tl_find_python() {
    if [ -n "${TASKLEDGER_PYTHON:-}" ]; then
        tl_python_ok "$TASKLEDGER_PYTHON" ||
            tl_die "TASKLEDGER_PYTHON=$TASKLEDGER_PYTHON is not a working Python >= 3.11"
        printf '%s\n' "$TASKLEDGER_PYTHON"
        return
    fi
    local candidate
    for candidate in python3.11 python3 python3.12 python3.13 python3.14 python; do
        if tl_have "$candidate" && tl_python_ok "$candidate"; then
            command -v "$candidate"
            return
        fi
    done
    tl_die "no Python >= 3.11 found (tried python3.11, python3, python3.12, python3.13, python3.14, python)." \
        "Install one (Debian/Ubuntu: apt-get install python3.11 python3.11-venv)" \
        "or point TASKLEDGER_PYTHON at it."
}

# Create $TL_VENV with interpreter $1; on Debian/Ubuntu install the missing venv package
# (ensurepip) when we are root and retry once.
tl_create_venv() {
    local python="$1" log
    log="$(mktemp)"
    tl_say "creating $TL_VENV with $python ($("$python" -c 'import sys; print(sys.version.split()[0])'))"
    if "$python" -m venv "$TL_VENV" >"$log" 2>&1; then
        rm -f "$log"
        return
    fi
    rm -rf "$TL_VENV"
    if grep -qi 'ensurepip' "$log"; then
        local minor
        minor="$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
        if tl_can_apt; then
            tl_say "the venv module lacks ensurepip; installing python$minor-venv"
            tl_apt_install "python$minor-venv" || tl_apt_install python3-venv ||
                tl_die "could not install python$minor-venv / python3-venv with apt-get"
            if "$python" -m venv "$TL_VENV" >"$log" 2>&1; then
                rm -f "$log"
                return
            fi
            rm -rf "$TL_VENV"
        else
            cat "$log" >&2
            rm -f "$log"
            tl_die "'$python -m venv' needs ensurepip. Install it: sudo apt-get install python$minor-venv"
        fi
    fi
    cat "$log" >&2
    rm -f "$log"
    tl_die "could not create the virtual environment $TL_VENV"
}

# tl_ensure_venv [EXTRA]: make .venv exist and hold `pip install -c constraints.txt -e .[EXTRA]`.
tl_ensure_venv() {
    local extra="${1:-}"
    if [ -d "$TL_VENV" ]; then
        if ! tl_python_ok "$TL_PYTHON"; then
            tl_warn "$TL_VENV is broken or older than Python 3.11; recreating it"
            rm -rf "$TL_VENV"
        elif ! "$TL_PYTHON" -c 'import pip' >/dev/null 2>&1 &&
            ! "$TL_PYTHON" -m ensurepip --upgrade >/dev/null 2>&1; then
            tl_warn "$TL_VENV has no pip and ensurepip cannot add it (half-created?); recreating it"
            rm -rf "$TL_VENV"
        fi
    fi
    if [ ! -d "$TL_VENV" ]; then
        local python
        python="$(tl_find_python)" || exit 1
        tl_create_venv "$python"
    fi

    # The stamp holds "<sha256 of pyproject.toml and constraints.txt> <extras installed>".
    local digest stamp_digest="" stamp_extra="" spec="."
    digest="$(cat "$TL_ROOT/pyproject.toml" "$TL_ROOT/constraints.txt" | sha256sum | cut -d' ' -f1)"
    if [ -f "$TL_STAMP" ]; then
        read -r stamp_digest stamp_extra <"$TL_STAMP" || true
    fi
    if [ "$stamp_digest" = "$digest" ] && { [ -z "$extra" ] || [ "$stamp_extra" = "$extra" ]; }; then
        return
    fi
    local reason="first install"
    if [ -n "$stamp_digest" ] && [ "$stamp_digest" != "$digest" ]; then
        reason="pyproject.toml or constraints.txt changed"
    elif [ -n "$stamp_digest" ]; then
        reason="adding the [$extra] extras"
    fi
    if [ -n "$extra" ]; then
        spec=".[$extra]"
    fi
    # constraints.txt pins every dependency: CI, a laptop and the image install the same.
    tl_say "installing taskledger into .venv: pip install -c constraints.txt -e \"$spec\" ($reason)"
    (cd "$TL_ROOT" && "$TL_PYTHON" -m pip install --quiet --disable-pip-version-check \
        -c constraints.txt -e "$spec") ||
        tl_die "pip install -c constraints.txt -e \"$spec\" failed (see above)"
    printf '%s %s\n' "$digest" "$extra" >"$TL_STAMP"
}
