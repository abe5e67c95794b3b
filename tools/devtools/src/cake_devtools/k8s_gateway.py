"""Renders the Kubernetes variant of the Envoy gateway config: ``k8s/base/gateway/envoy.yaml``.

``uv run python -m cake_devtools.k8s_gateway`` writes it from ``gateway/envoy.yaml.j2`` (through
:mod:`cake_devtools.gateway_config`, the only renderer); ``--check`` fails when the committed
file is stale (tests/k8s runs the same comparison). Kustomize turns the file into the gateway's
ConfigMap; the gateway image (``gateway/Dockerfile``) carries the descriptor set.

What differs from the local stack lives in :func:`k8s_gateway_context`: the listeners listen
on all addresses of the pod (the admin interface on loopback only, reached from outside the
pod through the ``ops`` listener's two read-only paths), the upstreams are the services' DNS
names on the in-cluster gRPC port, the JWKS is fetched from the pod's own listener (which
routes it to auth, so no key file is mounted and a rotation needs no gateway roll), and the
generated files (descriptor set, OpenAPI document) and the /docs page's files are named by
their paths relative to the repository root, which is also the gateway image's working
directory, so the same names resolve here and in the pod.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path

from cake_devtools.gateway_config import (
    GatewayConfigError,
    GatewayContext,
    Upstream,
    gateway_dir,
    render_gateway_config,
)

#: Port every service serves gRPC on inside the cluster (``CAKE_<SVC>_GRPC_PORT``).
SERVICE_GRPC_PORT = 50051
#: The gateway container's listener (its Service port and Tilt's port-forward), its admin port
#: (loopback only: kubectl port-forward reaches it, nothing else) and the ops listener (GET
#: /ready for the probes and GET /stats/prometheus for Prometheus, nothing else).
LISTEN_PORT = 8080
ADMIN_PORT = 9901
OPS_PORT = 9902
#: Relative to the repository root here, and to the gateway image's WORKDIR in the pod.
DESCRIPTOR_PATH = Path("gateway/generated/cake.pb")
OPENAPI_PATH = Path("gateway/generated/openapi.json")
#: The /docs page's own files, and Swagger UI's (the image extracts them from the pinned
#: ``swagger-ui-py`` wheel, see gateway/Dockerfile).
DOCS_PAGES_DIR = Path("gateway/docs")
SWAGGER_UI_DIR = Path("gateway/docs/swagger-ui")
#: Relative to the repository root.
OUTPUT_PATH = Path("k8s/base/gateway/envoy.yaml")


def repository_root() -> Path:
    return gateway_dir().parent


def k8s_upstreams(port: int = SERVICE_GRPC_PORT) -> tuple[Upstream, ...]:
    """The services by their Service names (headless: Envoy balances across pods)."""
    return (
        Upstream("auth", "auth", port, "/cake.auth."),
        Upstream("promotions", "promotions", port, "/cake.promotions."),
        Upstream("notifications", "notifications", port, "/cake.notifications."),
        Upstream("events", "events", port, "/cake.events."),
    )


def k8s_gateway_context(
    *,
    descriptor_path: Path = DESCRIPTOR_PATH,
    openapi_path: Path = OPENAPI_PATH,
    docs_pages_dir: Path = DOCS_PAGES_DIR,
    swagger_ui_dir: Path = SWAGGER_UI_DIR,
) -> GatewayContext:
    """The pod's context; tests pass local paths to validate a copy with ``envoy``."""
    return GatewayContext(
        listen_address="0.0.0.0",  # noqa: S104 - the pod's interfaces; the Service fronts it
        listen_port=LISTEN_PORT,
        admin_address="127.0.0.1",
        admin_port=ADMIN_PORT,
        ops_port=OPS_PORT,
        descriptor_path=descriptor_path,
        upstreams=k8s_upstreams(),
        openapi_path=openapi_path,
        docs_pages_dir=docs_pages_dir,
        swagger_ui_dir=swagger_ui_dir,
    )


def render_k8s_gateway_config(repo: Path | None = None) -> str:
    """The config text; the relative descriptor path is checked against ``repo``."""
    # The renderer checks that the descriptor set exists and serves the transcoded services;
    # the relative path resolves against the working directory, so run it from the root.
    with contextlib.chdir(repo or repository_root()):
        return render_gateway_config(k8s_gateway_context())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cake_devtools.k8s_gateway",
        description=f"render {OUTPUT_PATH} from gateway/envoy.yaml.j2",
    )
    parser.add_argument(
        "--check", action="store_true", help="fail if the committed file is stale, write nothing"
    )
    args = parser.parse_args(argv)
    repo = repository_root()
    destination = repo / OUTPUT_PATH
    try:
        text = render_k8s_gateway_config(repo)
    except GatewayConfigError as error:
        print(f"k8s gateway config: {error}", file=sys.stderr)
        return 1
    current = destination.read_text(encoding="utf-8") if destination.is_file() else None
    if args.check:
        if current != text:
            print(
                f"{OUTPUT_PATH} is stale; run `uv run python -m cake_devtools.k8s_gateway`",
                file=sys.stderr,
            )
            return 1
        print(f"{OUTPUT_PATH} is up to date")
        return 0
    if current == text:
        print(f"{OUTPUT_PATH} unchanged")
        return 0
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
