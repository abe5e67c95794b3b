# Make is only the front door: the logic lives in tools/ (bash bootstrap + Python tooling).
# tools/bootstrap.sh may install uv with `pip install --user`, into ~/.local/bin.
export PATH := $(HOME)/.local/bin:$(PATH)
# Optional, git-ignored, one `export CAKE_...=value` per line: this checkout's own ports, so two
# checkouts can run their stacks side by side (pytest reads the same file, see conftest.py).
-include .ports.env

.PHONY: up down status test test-unit gen lint bench bench-enrollment chaos help k8s-test cluster-up cluster-down

help: ## list targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

up: ## install what is missing, start the whole local stack, wait until healthy
	@bash tools/bootstrap.sh
	@uv run --frozen cake-stack up

down: ## stop the local stack (data stays in .run/dev)
	@uv run --frozen cake-stack down

status: ## show what the local stack runs
	@uv run --frozen cake-stack status

test: ## install what is missing and run every check and test (starts its own test stack)
	@bash tools/run-tests.sh

# PYTHONDONTWRITEBYTECODE (set in some shells) would make every run compile the workspace's
# sources and re-run pytest's assertion rewriting of every test module: about 4 s of CPU per
# run of the unit layer (pytest --collect-only under /usr/bin/time, with and without it).
# The caches land in __pycache__/, which git and the image builds ignore.
test-unit: ## only the unit layer (no test stack): libs, services/*/tests/unit, tools, tests/contracts
	@uv sync --frozen --compile-bytecode --quiet
	@env -u PYTHONDONTWRITEBYTECODE uv run --frozen pytest -q -m "not integration and not e2e and not slow" libs services/*/tests/unit tools tests/contracts

gen: ## regenerate Python code, type stubs and the Envoy descriptor set from protos/
	@bash tools/bootstrap.sh
	@uv run --frozen cake-codegen

lint: ## ruff, mypy, buf lint and generated-code freshness only
	@bash tools/run-tests.sh --lint-only

bench: ## ceilings + load scenarios (vegeta) + the launch day (5,000 first logins for 1,000 vouchers) against the running stack, reports in bench/results/; PEER_URL=http://host:port: side by side with that peer, ratios
	@bash tools/bootstrap.sh
	@uv run --frozen python bench/run.py $(if $(PEER_URL),--peer-url $(PEER_URL))
	@$(if $(PEER_URL),true,uv run --frozen python bench/enrollment.py --steps ceiling,launch-day)

bench-enrollment: ## first-login pipeline against the running stack: goals, enrollment ceiling, launch day (bench/results/enrollment-*)
	@uv run --frozen python bench/enrollment.py

chaos: ## fault drills: first-login bursts (SIGKILL relay/consumer/Kafka, stop Postgres/Redis) and top-ups (bank hang/down, promotions SIGKILL, Postgres stop)
	@uv run --frozen python bench/chaos.py

cluster-up: ## a real single-node Kubernetes on this machine (host processes; builds binaries once)
	@bash tools/bootstrap.sh
	@uv run --frozen cake-cluster up

cluster-down: ## tear that cluster down completely (containerd/dockerd and cached binaries stay)
	@bash tools/bootstrap.sh
	@uv run --frozen cake-cluster down

k8s-test: ## build and load the images, deploy k8s/overlays/dev to the cluster of cluster-up, test it there
	@bash tools/bootstrap.sh
	@uv run --frozen python -m cake_devtools.k8s_test
