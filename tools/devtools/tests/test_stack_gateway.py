"""The Envoy gateway config: rendering, ``envoy --mode validate``, and the /health contract
checked against a real Envoy with a fake events service (about a second; no stack needed).

The fake service answers with raw protobuf bytes through a generic handler, so no generated
module for the test proto enters the default descriptor pool (the real contracts live there).
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import httpx
import pytest
import yaml
from cake_devtools.gateway_config import (
    HEALTH_SERVICE,
    GatewayConfigError,
    GatewayContext,
    Upstream,
    default_descriptor_path,
    local_upstreams,
    render_gateway_config,
    write_gateway_config,
)
from cake_devtools.stack.envoy import envoy_binary, local_gateway_context, validate_config
from cake_devtools.stack.settings import StackSettingsForTests

HEALTH_PROTO = """
syntax = "proto3";
package cake.events.v1;
import "google/api/annotations.proto";
message GetSystemHealthRequest {}
message GetSystemHealthResponse {
  string status = 1;
  int64 uptime_ms = 2;
  bool degraded = 3;
}
service SystemHealthService {
  rpc GetSystemHealth(GetSystemHealthRequest) returns (GetSystemHealthResponse) {
    option (google.api.http) = {get: "/health"};
  }
}
"""
# GetSystemHealthResponse{status: "healthy", uptime_ms: 2**40}, encoded by hand.
HEALTHY_RESPONSE = b"\x0a\x07healthy" + b"\x10\x80\x80\x80\x80\x80\x20"
# GetSystemHealthResponse{status: "unhealthy"}.
UNHEALTHY_RESPONSE = b"\x0a\x09unhealthy"


@pytest.fixture(scope="module")
def descriptor_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A descriptor set with just the health RPC, built with protoc from grpcio-tools."""
    import google.api.annotations_pb2
    import grpc_tools  # type: ignore[import-untyped]
    from grpc_tools import protoc

    workdir = tmp_path_factory.mktemp("proto")
    (workdir / "health.proto").write_text(HEALTH_PROTO)
    googleapis = Path(google.api.annotations_pb2.__file__).parents[2]
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    output = workdir / "cake.pb"
    status = protoc.main(
        [
            "protoc",
            f"-I{workdir}",
            f"-I{googleapis}",
            f"-I{well_known}",
            "--include_imports",
            f"--descriptor_set_out={output}",
            "health.proto",
        ]
    )
    assert status == 0
    return output


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _context(
    descriptor: Path, *, events_port: int = 57153, listen_port: int = 18080
) -> GatewayContext:
    return GatewayContext(
        listen_address="127.0.0.1",
        listen_port=listen_port,
        admin_address="127.0.0.1",
        admin_port=_free_port(),
        descriptor_path=descriptor,
        upstreams=local_upstreams(auth_port=57151, promotions_port=57152, events_port=events_port),
    )


def _http_filters(config: dict[str, object]) -> list[dict[str, object]]:
    listener = config["static_resources"]["listeners"][0]  # type: ignore[index]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return manager["http_filters"]  # type: ignore[no-any-return]


def test_rendered_config_binds_loopback_and_routes_grpc_paths(descriptor_set: Path) -> None:
    config = yaml.safe_load(render_gateway_config(_context(descriptor_set)))

    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    listener = config["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 18080}
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    assert set(clusters) == {"auth", "promotions", "events"}
    events = clusters["events"]
    assert events["type"] == "STATIC"
    assert "http2_protocol_options" in str(events["typed_extension_protocol_options"])
    endpoint = events["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 57153}

    routes = listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]
    matches = [route["match"] for route in routes["virtual_hosts"][0]["routes"]]
    assert matches[0] == {"path": f"/{HEALTH_SERVICE}/GetSystemHealth"}
    assert {"prefix": "/cake.auth."} in matches


def test_transcoder_prints_defaults_and_converts_grpc_status(descriptor_set: Path) -> None:
    filters = _http_filters(yaml.safe_load(render_gateway_config(_context(descriptor_set))))

    names = [f["name"] for f in filters]
    assert names == [
        "envoy.filters.http.lua",
        "envoy.filters.http.grpc_json_transcoder",
        "envoy.filters.http.router",
    ]
    transcoder = filters[1]["typed_config"]
    assert transcoder["proto_descriptor"] == str(descriptor_set)  # type: ignore[index]
    assert transcoder["services"] == [HEALTH_SERVICE]  # type: ignore[index]
    assert transcoder["convert_grpc_status"] is True  # type: ignore[index]
    assert transcoder["print_options"] == {  # type: ignore[index]
        "always_print_primitive_fields": True,
        "preserve_proto_field_names": False,
    }


def test_dns_upstreams_use_strict_dns(descriptor_set: Path) -> None:
    context = _context(descriptor_set)
    k8s = GatewayContext(
        **{
            **context.__dict__,
            "upstreams": (Upstream("events", "events.cake.svc", 50051, "/cake.events."),),
        }
    )
    config = yaml.safe_load(render_gateway_config(k8s))
    assert config["static_resources"]["clusters"][0]["type"] == "STRICT_DNS"


def test_missing_descriptor_set_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(GatewayConfigError, match="does not exist; generate it"):
        render_gateway_config(_context(tmp_path / "absent.pb"))


def test_descriptor_without_the_health_service_is_rejected(tmp_path: Path) -> None:
    from google.protobuf import descriptor_pb2

    empty = tmp_path / "empty.pb"
    empty.write_bytes(descriptor_pb2.FileDescriptorSet().SerializeToString())
    with pytest.raises(GatewayConfigError, match=f"no service {HEALTH_SERVICE}"):
        render_gateway_config(_context(empty))


def test_envoy_accepts_the_rendered_config(descriptor_set: Path, tmp_path: Path) -> None:
    config = write_gateway_config(_context(descriptor_set), tmp_path / "envoy.yaml")
    validate_config(config)


@pytest.mark.skipif(
    not default_descriptor_path().is_file(), reason="gateway/generated/cake.pb not generated yet"
)
def test_envoy_accepts_the_local_stack_config_with_the_real_contracts(tmp_path: Path) -> None:
    context = local_gateway_context(StackSettingsForTests())
    validate_config(write_gateway_config(context, tmp_path / "envoy.yaml"))


# -- a real Envoy in front of a fake events service ------------------------------------------


class FakeEvents:
    """gRPC server answering GetSystemHealth with fixed bytes."""

    def __init__(self) -> None:
        self.response = HEALTHY_RESPONSE
        self.port = _free_port()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))

        def get_system_health(_request: bytes, _context: grpc.ServicerContext) -> bytes:
            return self.response

        handler = grpc.unary_unary_rpc_method_handler(
            get_system_health,
            request_deserializer=lambda data: data,
            response_serializer=lambda data: data,
        )
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(HEALTH_SERVICE, {"GetSystemHealth": handler}),)
        )
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")


@pytest.fixture(scope="module")
def fake_events() -> FakeEvents:
    return FakeEvents()


@pytest.fixture(scope="module")
def gateway(
    descriptor_set: Path, fake_events: FakeEvents, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    context = _context(descriptor_set, events_port=fake_events.port, listen_port=_free_port())
    config = write_gateway_config(context, tmp_path_factory.mktemp("envoy") / "envoy.yaml")
    envoy = subprocess.Popen(
        [envoy_binary(), "-c", str(config), "--disable-hot-restart", "--log-level", "error"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    admin = f"http://127.0.0.1:{context.admin_port}/ready"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(admin, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert envoy.poll() is None, envoy.stderr.read() if envoy.stderr else ""
            assert time.monotonic() < deadline, "envoy did not become ready"
            time.sleep(0.1)
        yield f"http://127.0.0.1:{context.listen_port}"
    finally:
        envoy.terminate()
        envoy.wait(timeout=10)
        if envoy.stderr:
            envoy.stderr.close()


def test_health_is_503_json_when_the_events_service_is_down(gateway: str) -> None:
    response = httpx.get(f"{gateway}/health")

    assert response.status_code == 503
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["status"] == "unhealthy"
    assert body["checks"]["events"] == "unhealthy"
    assert body["error"]
    assert body["timestamp"].endswith("Z")


def test_health_is_transcoded_from_the_events_service(
    gateway: str, fake_events: FakeEvents
) -> None:
    fake_events.server.start()
    try:
        fake_events.response = HEALTHY_RESPONSE
        healthy = httpx.get(f"{gateway}/health")
        fake_events.response = UNHEALTHY_RESPONSE
        unhealthy = httpx.get(f"{gateway}/health")
    finally:
        fake_events.server.stop(grace=None)

    assert healthy.status_code == 200
    # int64 as a string, lowerCamelCase, and defaults printed (degraded: false).
    assert healthy.json() == {"status": "healthy", "uptimeMs": str(2**40), "degraded": False}
    assert unhealthy.status_code == 503  # the service's own "unhealthy" verdict
    assert unhealthy.json() == {"status": "unhealthy", "uptimeMs": "0", "degraded": False}


def test_envoy_local_replies_are_status_json(gateway: str) -> None:
    response = httpx.get(f"{gateway}/no/such/path")

    assert response.status_code == 404
    assert json.loads(response.text) == {
        "code": 5,
        "message": "Cannot GET /no/such/path",
        "details": [],
    }
