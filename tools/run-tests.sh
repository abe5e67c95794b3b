#!/usr/bin/env bash
# `make test`: install what is missing, then run every check and every test.
# The pytest session starts its own stack of real servers (profile "test", its own ports),
# so this works whether or not a `make up` stack is running.
set -euo pipefail
cd "$(dirname "$0")/.."

# Compiled bytecode and pytest's rewritten test modules are cached in __pycache__/ (ignored by
# git and the image builds): with PYTHONDONTWRITEBYTECODE set, every pytest run below would
# compile them all again (about 4 s of CPU per unit-layer run, see the Makefile's test-unit).
unset PYTHONDONTWRITEBYTECODE

lint_only=false
[[ "${1:-}" == "--lint-only" ]] && lint_only=true

step() { printf '\n==> %s\n' "$*"; }

step "bootstrap (apt packages, uv, Python environment)"
if $lint_only; then bash tools/bootstrap.sh; else bash tools/bootstrap.sh --tests; fi

step "generated code is fresh (cake-codegen --check)"
uv run --frozen cake-codegen --check

step "buf lint (STANDARD)"
uv run --frozen cake-codegen lint

step "buf breaking against the previous commit"
uv run --frozen cake-codegen breaking

step "ruff lint + format check"
uv run --frozen ruff check .
uv run --frozen ruff format --check .

step "mypy (strict)"
uv run --frozen mypy

if $lint_only; then exit 0; fi

# A checkout's .ports.env (see the Makefile) also names dev ports such as
# CAKE_PROMOTIONS_METRICS_PORT, which are the services' own settings too: test servers must
# not inherit them (two would bind one port). Only its CAKE_TEST_* reach pytest.
if [[ -f .ports.env ]]; then
    while read -r name; do
        unset "$name"
    done < <(sed -n 's/^export \(CAKE_[A-Z0-9_]*\)=.*/\1/p' .ports.env | grep -v '^CAKE_TEST_' || true)
fi

# Cake supports Python 3.11 and later: the unit layer also runs on 3.12 and 3.13, each in its
# own environment synced from the same lock (build/venv-3.x); a missing interpreter fails here.
# Only in the full run: `run-tests.sh <pytest args>` (a targeted run) leaves it out.
(( $# > 0 )) || for version in 3.12 3.13; do
    step "unit layer on Python $version"
    python=$(uv run --frozen python -m cake_devtools.interpreters "$version")
    UV_PROJECT_ENVIRONMENT="build/venv-$version" uv sync --frozen --quiet --python "$python"
    UV_PROJECT_ENVIRONMENT="build/venv-$version" uv run --frozen --python "$python" \
        pytest -q -p no:cacheprovider -m "not integration and not e2e and not slow" \
        libs services/*/tests/unit tools tests/contracts
done

step "pytest: unit, integration, end-to-end, race and fault tests"
uv run --frozen pytest "${@}"
