"""The Kubernetes gateway config (k8s/base/gateway/envoy.yaml) is fresh, Envoy accepts it, and
it agrees with the gateway's image and manifests."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml
from cake_devtools import k8s_gateway
from cake_devtools.gateway_config import (
    default_descriptor_path,
    default_docs_pages_dir,
    default_swagger_ui_dir,
    render_gateway_config,
)
from cake_devtools.k8s_manifests import RenderedOverlay, generator_name, pod_spec, venv_tool


def committed(repo: Path) -> str:
    return (repo / k8s_gateway.OUTPUT_PATH).read_text(encoding="utf-8")


def test_committed_config_is_fresh(repo: Path) -> None:
    assert committed(repo) == k8s_gateway.render_k8s_gateway_config(repo), (
        "stale: run `uv run python -m cake_devtools.k8s_gateway`"
    )
    assert k8s_gateway.main(["--check"]) == 0


def test_envoy_validates_the_config_with_local_file_paths(repo: Path, tmp_path: Path) -> None:
    """The pod's file paths exist only in the container; a copy rendered with local paths
    (the real descriptor set, an OpenAPI stand-in) is otherwise the same text."""
    openapi = tmp_path / "openapi.json"
    openapi.write_text('{"openapi": "3.0.3", "info": {"title": "stand-in", "version": "0"}}')
    local: dict[Path, Path] = {
        k8s_gateway.DESCRIPTOR_PATH: default_descriptor_path(),
        k8s_gateway.OPENAPI_PATH: openapi,
    }
    context = k8s_gateway.k8s_gateway_context(
        descriptor_path=local[k8s_gateway.DESCRIPTOR_PATH],
        openapi_path=local[k8s_gateway.OPENAPI_PATH],
        docs_pages_dir=default_docs_pages_dir(),
        swagger_ui_dir=default_swagger_ui_dir(),
    )
    # The /docs page's files: from the repository and the swagger-ui-py wheel.
    pod_docs = k8s_gateway.k8s_gateway_context().docs_files
    for pod_file, local_file in zip(pod_docs, context.docs_files, strict=True):
        local[pod_file.filename] = local_file.filename
    text = render_gateway_config(context)
    restored = text
    for pod_path, local_path in local.items():
        assert json.dumps(str(local_path)) in text
        restored = restored.replace(json.dumps(str(local_path)), json.dumps(str(pod_path)))
    assert restored == committed(repo)

    config = tmp_path / "envoy.yaml"
    config.write_text(text)
    result = subprocess.run(
        [venv_tool("envoy"), "--mode", "validate", "-c", str(config), "--log-level", "warn"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


def socket_addresses(config: dict[str, Any]) -> dict[str, tuple[str, int]]:
    found = {}
    for cluster in config["static_resources"]["clusters"]:
        for endpoints in cluster["load_assignment"].get("endpoints", []):
            for lb_endpoint in endpoints["lb_endpoints"]:
                address = lb_endpoint["endpoint"]["address"]["socket_address"]
                found[cluster["name"]] = (address["address"], address["port_value"])
    return found


def test_config_agrees_with_the_gateway_image_and_manifests(
    repo: Path, overlays: dict[str, RenderedOverlay]
) -> None:
    text = committed(repo)
    config = yaml.safe_load(text)
    dockerfile = (repo / "gateway/Dockerfile").read_text()
    for overlay in overlays.values():
        deployment = overlay.get("Deployment", "gateway")
        spec = pod_spec(deployment)
        (envoy,) = spec["containers"]
        ports = {p["name"]: p["containerPort"] for p in envoy["ports"]}
        listeners = {
            listener["name"]: listener["address"]["socket_address"]["port_value"]
            for listener in config["static_resources"]["listeners"]
        }
        assert listeners == {"gateway": ports["http"], "ops": ports["ops"]}
        # The admin port is the pod's loopback's only: no container port, no probe, no scrape.
        assert config["admin"]["address"]["socket_address"]["port_value"] not in ports.values()
        assert envoy["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "ops"}
        assert envoy["livenessProbe"]["tcpSocket"] == {"port": "ops"}
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(ports["ops"])
        assert annotations["prometheus.io/path"] == "/stats/prometheus"
        service = overlay.get("Service", "gateway")
        assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]

        # The ConfigMap carries exactly the committed file, mounted where Envoy reads it.
        mounts = {m["name"]: m["mountPath"] for m in envoy["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        config_map = overlay.get("ConfigMap", volumes["config"]["configMap"]["name"])
        assert generator_name(config_map) == "gateway-config"
        assert config_map["data"]["envoy.yaml"] == text
        assert envoy["args"][envoy["args"].index("--config-path") + 1] == (
            f"{mounts['config']}/envoy.yaml"
        )
        # No key file: jwt_authn fetches the JWKS through the pod's own listener (auth's
        # GetJwks), so a rotation needs no gateway roll.
        assert "jwks" not in volumes
        provider = next(
            f["typed_config"]["providers"]["cake"]
            for listener in config["static_resources"]["listeners"]
            for chain in listener["filter_chains"]
            for network in chain["filters"]
            for f in network["typed_config"].get("http_filters", [])
            if f["name"] == "envoy.filters.http.jwt_authn"
        )
        jwks_uri = provider["remote_jwks"]["http_uri"]["uri"]
        assert jwks_uri == f"http://127.0.0.1:{ports['http']}/.well-known/jwks.json"
        assert socket_addresses(config)["jwks"] == ("127.0.0.1", ports["http"])
        # Generated files are resolved against the working directory, which mirrors the
        # repository in the image (WORKDIR + COPY gateway/generated/).
        assert envoy["workingDir"] == "/srv/cake"
        assert "WORKDIR /srv/cake" in dockerfile
        assert "COPY gateway/generated/ gateway/generated/" in dockerfile
        for generated in (k8s_gateway.DESCRIPTOR_PATH, k8s_gateway.OPENAPI_PATH):
            assert not generated.is_absolute()
            assert generated.parent == Path("gateway/generated")
            assert json.dumps(str(generated)) in text

        # Every upstream is a Service of the overlay on its grpc port (headless, so Envoy's
        # STRICT_DNS cluster sees every pod).
        addresses = socket_addresses(config)
        # except the ops listener's way to the admin interface, on the pod's loopback.
        assert addresses.pop("envoy_admin") == ("127.0.0.1", k8s_gateway.ADMIN_PORT)
        # and the JWKS, fetched through the pod's own listener (checked above).
        addresses.pop("jwks")
        for cluster, (host, port) in addresses.items():
            upstream = overlay.get("Service", host)
            (grpc,) = [p for p in upstream["spec"]["ports"] if p["name"] == "grpc"]
            assert grpc["port"] == port, cluster
            assert upstream["spec"]["clusterIP"] == "None", cluster
