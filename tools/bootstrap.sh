#!/usr/bin/env bash
# Install what the local stack and the tests need on a machine that has never seen Cake.
# Idempotent: every step checks first and only acts when something is missing, so `make up`
# and `make test` run it every time. Debian/Ubuntu (apt) for the OS packages.
# `--tests` (tools/run-tests.sh) also installs what only the tests use: Debian's `chromium`,
# the headless browser that loads the gateway's /docs page (tests/e2e/test_gateway_docs.py).
set -euo pipefail
cd "$(dirname "$0")/.."

for_tests=false
[[ "${1:-}" == "--tests" ]] && for_tests=true

say() { printf 'bootstrap: %s\n' "$*"; }
die() { printf 'bootstrap: ERROR: %s\n' "$*" >&2; exit 1; }

# Root runs apt directly; otherwise sudo if there is one (never prompts in CI: -n).
as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@" || die "need root for: $* (run it yourself or allow sudo)"
    else
        die "need root for: $* (not root and no sudo)"
    fi
}

# --- OS packages ----------------------------------------------------------------------------
# PostgreSQL server binaries (Debian keeps them in /usr/lib/postgresql/<major>/bin) and Redis.
missing=()
if ! compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null && ! command -v pg_ctl >/dev/null; then
    missing+=(postgresql)
fi
command -v redis-server >/dev/null || missing+=(redis-server)
# A C compiler and the C library's headers: cake-bcrypt (the auth service's hasher) is a C
# extension that uv builds when it syncs the environment (Python's own headers come with the
# interpreter uv uses).
command -v cc >/dev/null || missing+=(gcc)
[[ -e /usr/include/stdint.h ]] || missing+=(libc6-dev)
if $for_tests && ! command -v chromium >/dev/null; then
    missing+=(chromium)
fi

if ((${#missing[@]})); then
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get; install them yourself"
    say "installing ${missing[*]} (apt-get)"
    as_root apt-get update -qq
    # The packages would start system-wide servers on the default ports; the stack runs its
    # own on other ports, so keep the system ones from starting (policy-rc.d, exit 101).
    policy=/usr/sbin/policy-rc.d
    created_policy=false
    if [[ ! -e $policy ]]; then
        as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod +x $policy"
        created_policy=true
    fi
    status=0
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" || status=$?
    if $created_policy; then as_root rm -f "$policy"; fi
    ((status == 0)) || die "apt-get install ${missing[*]} failed"
else
    say "postgresql, redis-server, a C compiler$($for_tests && echo ' and chromium') present"
fi

# --- Java and Maven (Kafka runs from its Maven Central jars) ---------------------------------
command -v java >/dev/null || die "java not found: install a JRE 17+ (e.g. apt-get install openjdk-17-jre-headless)"
java_major=$(java -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p')
[[ ${java_major%%.*} -ge 17 ]] 2>/dev/null || die "java ${java_major:-?} found, Kafka 4 needs 17+"
command -v mvn >/dev/null || die "mvn not found: install Maven (e.g. apt-get install maven)"
say "java ${java_major} and $(mvn -v 2>/dev/null | head -1 | sed 's/\x1b\[[0-9;]*m//g') present"

# --- uv and the Python environment ----------------------------------------------------------
if ! command -v uv >/dev/null; then
    say "installing uv (pip install uv)"
    if ! python3 -m pip --version >/dev/null 2>&1; then
        command -v apt-get >/dev/null || die "python3 has no pip; install pip or uv yourself"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip
    fi
    if ! python3 -m pip install --quiet uv 2>/dev/null; then
        # Debian's system Python refuses installs into itself (PEP 668); a user install of
        # a standalone binary like uv cannot break it.
        python3 -m pip install --quiet --user --break-system-packages uv
    fi
    export PATH="$HOME/.local/bin:$PATH"
    hash -r
    command -v uv >/dev/null || die "uv installed but not found on PATH"
    say "uv installed at $(command -v uv) (make sure its folder is on your PATH)"
fi

# --- vegeta, the benchmarks' HTTP load generator (MIT), from the Go module proxy -------------
# Built into the checkout's git-ignored .tools/bin at a pinned version (bench/ runs it there).
VEGETA_VERSION=v12.13.0
vegeta_bin="$PWD/.tools/bin/vegeta"
if [[ ! -x $vegeta_bin ]] || ! "$vegeta_bin" -version 2>/dev/null | grep -q "${VEGETA_VERSION#v}"; then
    command -v go >/dev/null || die "go not found: install Go 1.22+ (e.g. apt-get install golang) to build vegeta"
    say "go install github.com/tsenart/vegeta/v12@${VEGETA_VERSION} into .tools/bin"
    GOBIN="$PWD/.tools/bin" GOFLAGS=-mod=mod CGO_ENABLED=0 \
        go install -ldflags "-X main.Version=${VEGETA_VERSION#v}" \
        "github.com/tsenart/vegeta/v12@${VEGETA_VERSION}" \
        || die "go install vegeta ${VEGETA_VERSION} failed"
else
    say "vegeta ${VEGETA_VERSION} present"
fi

# --compile-bytecode: the environment's .pyc files are written once here, so no process
# (a test run, a service start) compiles the libraries again, also where the shell sets
# PYTHONDONTWRITEBYTECODE (then nothing would ever be cached). ~6 s the first time, under
# 1 s once compiled.
if [[ -f uv.lock ]]; then
    say "uv sync --frozen --compile-bytecode"
    uv sync --frozen --compile-bytecode
else
    say "no uv.lock: uv sync"
    uv sync --compile-bytecode
fi
say "done"
