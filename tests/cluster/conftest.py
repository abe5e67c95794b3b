"""Fixtures of the real-cluster suite (``make k8s-test``): Cake deployed from
``k8s/overlays/dev`` on the cluster of ``make cluster-up``, reached through the in-cluster
gateway (``kubectl port-forward service/gateway``, as the Tiltfile forwards it).

``cake_devtools.k8s_test`` builds and loads the images, deploys, forwards the port and then
runs this package with ``CAKE_K8S_GATEWAY_URL`` and friends set. Without them there is no
cluster to test, so the package is not collected (``make test`` runs everything else).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cake_devtools.cluster_client import Account, CakeClient
from cake_devtools.k8s_deploy import Kubectl


def pytest_ignore_collect(collection_path: Path) -> bool | None:
    if os.environ.get("CAKE_K8S_GATEWAY_URL"):
        return None
    return collection_path.suffix == ".py" and collection_path.name.startswith("test_")


@pytest.fixture(scope="session")
def gateway_url() -> str:
    return os.environ["CAKE_K8S_GATEWAY_URL"]


@pytest.fixture(scope="session")
def kubectl() -> Kubectl:
    return Kubectl(os.environ.get("KUBECONFIG") or None)


@pytest.fixture(scope="session")
def state_dir() -> Path:
    """Where k8s_test keeps the deployed image references and the drill figures."""
    return Path(os.environ["CAKE_K8S_STATE_DIR"])


@pytest.fixture(scope="session")
def record(state_dir: Path) -> Iterator[Any]:
    """``record(name, figures)``: figures for the summary table k8s_test prints."""
    path = state_dir / "results.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}

    def save(name: str, figures: dict[str, Any]) -> None:
        results[name] = figures
        path.write_text(json.dumps(results, indent=2))

    yield save


@pytest.fixture(scope="session")
def client(gateway_url: str) -> Iterator[CakeClient]:
    with CakeClient(gateway_url) as cake:
        yield cake


@pytest.fixture(scope="session")
def admin(client: CakeClient, kubectl: Kubectl) -> Account:
    """An admin made as an operator makes one: ``cake-auth create-admin`` in an auth pod."""
    username = f"k8s_admin_{uuid.uuid4().hex[:8]}"
    email, phone, password = f"{username}@example.com", client.new_phone(), "k8s-admin-pass"
    kubectl.run(
        *("exec", "deployment/auth", "-c", "server", "--", "cake-service", "create-admin"),
        *("--username", username, "--email", email, "--phone", phone, "--password", password),
        timeout=120,
    )
    answer = client.login(username, password)
    return Account(str(answer["user"]["id"]), username, password, answer["access_token"])


@pytest.fixture(scope="session")
def sql(kubectl: Kubectl) -> Any:
    """``sql(database, query)``: rows (tuples of text) read with psql in the postgres pod."""

    def run(database: str, query: str) -> list[tuple[str, ...]]:
        script = (
            'PGPASSWORD="$POSTGRES_PASSWORD" psql -h 127.0.0.1 -U postgres -X -A -t -F "|" '
            f'-v ON_ERROR_STOP=1 -d {database} -c "$0"'
        )
        result = kubectl.run(
            "exec", "statefulset/postgres", "--", "sh", "-c", script, query, timeout=60
        )
        return [tuple(line.split("|")) for line in result.stdout.splitlines() if line]

    return run


@pytest.fixture
def http(gateway_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway_url, timeout=30) as plain:
        yield plain
