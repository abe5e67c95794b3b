"""The Envoy gateway config: what the template renders from the contracts and the settings,
and ``envoy --mode validate`` on the configs the local stack writes (no Envoy left running).

The behaviour of a running gateway is tested in ``test_gateway_edge.py`` (fake services) and
``tests/e2e/test_gateway_*.py`` (the real stack).
"""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from cake_devtools.gateway_config import (
    AUTH_THROTTLED_METHODS,
    CREATED_METHODS,
    DOCS_CONTENT_SECURITY_POLICY,
    DOCS_REST_PATH,
    HEALTH_SERVICE,
    OPENAPI_REST_PATH,
    PATH_WITHOUT_TRAILING_SLASH_REGEX,
    TRANSCODED_SERVICES,
    GatewayConfigError,
    GatewayContext,
    Upstream,
    check_files,
    default_descriptor_path,
    default_openapi_path,
    local_upstreams,
    render_gateway_config,
    rest_api,
    write_gateway_config,
)
from cake_devtools.stack.component import StackContext
from cake_devtools.stack.envoy import (
    EnvoyComponent,
    GatewaySettings,
    load_gateway_settings,
    local_gateway_context,
    validate_config,
)
from cake_devtools.stack.errors import StackError
from cake_devtools.stack.layout import RunLayout
from cake_devtools.stack.settings import StackSettings, StackSettingsForTests
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

#: Starts a real Envoy: `make test` runs it, the quick `make test-unit` does not.
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _context(**overrides: Any) -> GatewayContext:
    settings: dict[str, Any] = {
        "listen_address": "127.0.0.1",
        "listen_port": 18080,
        "admin_address": "127.0.0.1",
        "admin_port": _free_port(),
        "descriptor_path": default_descriptor_path(),
        "openapi_path": default_openapi_path(),
        "upstreams": local_upstreams(
            auth_port=17151, promotions_port=17152, events_port=17153, notifications_port=17155
        ),
    }
    settings.update(overrides)
    return GatewayContext(**settings)


def _manager(config: dict[str, Any]) -> dict[str, Any]:
    listener = config["static_resources"]["listeners"][0]
    return listener["filter_chains"][0]["filters"][0]["typed_config"]  # type: ignore[no-any-return]


def _filters(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["name"]: f["typed_config"] for f in _manager(config)["http_filters"]}


def _routes(config: dict[str, Any]) -> list[dict[str, Any]]:
    return _manager(config)["route_config"]["virtual_hosts"][0]["routes"]  # type: ignore[no-any-return]


def _render(**overrides: Any) -> dict[str, Any]:
    return yaml.safe_load(render_gateway_config(_context(**overrides)))  # type: ignore[no-any-return]


# -- structure ---------------------------------------------------------------------------------


def test_filters_run_in_the_documented_order() -> None:
    names = [f["name"] for f in _manager(_render())["http_filters"]]

    assert names == [
        "cake.path_normaliser",
        "envoy.filters.http.header_mutation",
        "envoy.filters.http.cors",
        "envoy.filters.http.local_ratelimit",
        "envoy.filters.http.buffer",
        "envoy.filters.http.lua",
        "envoy.filters.http.grpc_json_transcoder",
        "envoy.filters.http.jwt_authn",
        "envoy.filters.http.router",
    ]


def _normalised(path: str) -> str:
    """What the normaliser's Lua makes of ``path`` (the same steps, in Python)."""
    bare, query = re.fullmatch(r"([^?#]*)(.*)", path, re.DOTALL).groups()  # type: ignore[union-attr]
    return (bare.rstrip("/") or "/") + query


@given(st.text(alphabet="/a?#.", min_size=1, max_size=12).map(lambda tail: "/" + tail))
def test_the_normaliser_is_skipped_exactly_for_paths_it_leaves_alone(path: str) -> None:
    # The matcher runs the Lua only where it changes the path, and every such path runs it.
    skipped = re.fullmatch(PATH_WITHOUT_TRAILING_SLASH_REGEX, path, re.DOTALL) is not None
    assert skipped == (_normalised(path) == path)


def test_the_normaliser_runs_behind_a_matcher_that_skips_paths_without_a_trailing_slash() -> None:
    wrapper = _filters(_render())["cake.path_normaliser"]

    assert wrapper["@type"].endswith("matching.v3.ExtensionWithMatcher")
    (matcher,) = wrapper["xds_matcher"]["matcher_list"]["matchers"]
    predicate = matcher["predicate"]["single_predicate"]
    assert predicate["input"]["typed_config"]["header_name"] == ":path"
    assert predicate["value_match"]["safe_regex"]["regex"] == PATH_WITHOUT_TRAILING_SLASH_REGEX
    assert matcher["on_match"]["action"]["typed_config"]["@type"].endswith(
        "matcher.action.v3.SkipFilter"
    )
    assert "on_no_match" not in wrapper["xds_matcher"]
    lua = wrapper["extension_config"]["typed_config"]
    assert lua["@type"].endswith("filters.http.lua.v3.Lua")
    assert "clearRouteCache" in lua["default_source_code"]["inline_string"]


def test_transcoder_serves_every_contract_service_strictly() -> None:
    transcoder = _filters(_render())["envoy.filters.http.grpc_json_transcoder"]

    assert transcoder["proto_descriptor"] == str(default_descriptor_path())
    assert transcoder["services"] == list(TRANSCODED_SERVICES)
    assert transcoder["convert_grpc_status"] is True
    assert transcoder["print_options"] == {
        "always_print_primitive_fields": True,
        "preserve_proto_field_names": False,
    }
    assert transcoder["request_validation_options"] == {
        "reject_unknown_method": True,
        "reject_unknown_query_parameters": True,
        "reject_binding_body_field_collisions": True,
    }


def test_every_rest_method_has_a_route_on_its_grpc_path() -> None:
    routes = {route["name"]: route for route in _routes(_render())}

    for method in rest_api():
        route = routes[method.full_name]
        assert route["match"] == {"path": method.grpc_path}
        lua = route["metadata"]["filter_metadata"]["envoy.filters.http.lua"]
        assert lua["rest_status"] == method.success_status
        assert lua.get("unwrap") == (method.response_body or None)
        retry = route["route"].get("retry_policy")
        if method.is_health:
            # /health answers for what it sees at once.
            assert retry is None
            continue
        # Reads after any transport failure; writes only when they never reached a service
        # (a write may have happened before a reset). Always on another host.
        if method.http_method == "GET":
            assert retry["retry_on"] == "connect-failure,refused-stream,reset,unavailable"
        else:
            assert retry["retry_on"] == "connect-failure,refused-stream", method.full_name
            # A slow write (a top-up waiting on the bank) is never cut short by a retry timer.
            assert "per_try_timeout" not in retry, method.full_name
        predicates = [p["name"] for p in retry["retry_host_predicate"]]
        assert predicates == ["envoy.retry_host_predicates.previous_hosts"]
    assert {m.full_name for m in rest_api() if m.success_status == 201} == CREATED_METHODS


def test_health_uses_a_cluster_without_health_checks() -> None:
    config = _render()
    health = next(r for r in _routes(config) if r["name"] == f"{HEALTH_SERVICE}/GetSystemHealth")
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}

    assert health["route"]["cluster"] == "events_unchecked"
    assert "health_checks" not in clusters["events_unchecked"]
    for name in ("auth", "promotions", "events"):
        cluster = clusters[name]
        assert cluster["common_lb_config"]["healthy_panic_threshold"] == {"value": 0}
        assert "grpc_health_check" in cluster["health_checks"][0]
        assert cluster["health_checks"][0]["no_traffic_interval"] == "2s"
        assert cluster["outlier_detection"]["enforcing_consecutive_5xx"] == 0
        address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        assert address["address"]["socket_address"]["address"] == "127.0.0.1"
        assert cluster["type"] == "STATIC"


def test_dns_upstreams_use_strict_dns() -> None:
    config = _render(
        upstreams=(
            Upstream("auth", "auth", 50051, "/cake.auth."),
            Upstream("promotions", "promotions", 50051, "/cake.promotions."),
            Upstream("notifications", "notifications", 50051, "/cake.notifications."),
            Upstream("events", "events", 50051, "/cake.events."),
        ),
    )
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}

    assert clusters["auth"]["type"] == "STRICT_DNS"
    assert clusters["events_unchecked"]["type"] == "STRICT_DNS"


def test_jwt_rules_leave_exactly_the_public_methods_open() -> None:
    jwt_filter = _filters(_render())["envoy.filters.http.jwt_authn"]
    rules = jwt_filter["rules"]
    provider = jwt_filter["providers"]["cake"]

    open_paths = {rule["match"]["path"] for rule in rules if "requires" not in rule}
    docs_paths = {docs_file.path for docs_file in _context().docs_files}
    assert DOCS_REST_PATH in docs_paths
    public = {method.grpc_path for method in _context().methods() if method.public}
    assert "/cake.auth.v1.AuthService/Token" in public
    assert "/cake.auth.v1.AuthService/GetProfile" not in public
    assert open_paths == {OPENAPI_REST_PATH} | docs_paths | public
    assert rules[-1] == {"match": {"prefix": "/"}, "requires": {"provider_name": "cake"}}
    remote = provider["remote_jwks"]
    assert remote["http_uri"] == {
        "uri": "http://127.0.0.1:18080/.well-known/jwks.json",
        "cluster": "jwks",
        "timeout": "2s",
    }
    assert remote["cache_duration"] == "300s"
    assert remote["async_fetch"] == {"fast_listener": True, "failed_refetch_duration": "1s"}
    assert remote["retry_policy"]["num_retries"] == 3
    assert provider["issuer"] == "cake-system"
    assert provider["audiences"] == ["cake-users"]
    assert provider["forward"] is True


def test_rate_limits_come_from_the_context() -> None:
    limiter = _filters(_render(rate_limit_per_minute=7, auth_rate_limit_per_minute=3))[
        "envoy.filters.http.local_ratelimit"
    ]
    buckets = {
        tuple(entry.get("value", "*") for entry in d["entries"]): d["token_bucket"]
        for d in limiter["descriptors"]
    }

    assert buckets[("*",)]["max_tokens"] == 7
    assert buckets[("auth", "*")]["max_tokens"] == 3
    assert buckets[("auth", "*")]["fill_interval"] == "60s"
    assert limiter["rate_limited_as_resource_exhausted"] is True
    assert limiter["enable_x_ratelimit_headers"] == "DRAFT_VERSION_03"
    auth_regex = limiter["rate_limits"][1]["actions"][0]["header_value_match"]["headers"][0]
    pattern = auth_regex["string_match"]["safe_regex"]["regex"]
    for name in AUTH_THROTTLED_METHODS:
        assert name.replace(".", r"\.") in pattern


def test_body_limit_cors_origins_and_connection_limit_come_from_the_context() -> None:
    config = _render(
        max_request_bytes=4096,
        cors_allowed_origins=("https://a.example", "*"),
        max_downstream_connections=77,
    )
    policy = _manager(config)["route_config"]["virtual_hosts"][0]["typed_per_filter_config"][
        "envoy.filters.http.cors"
    ]
    monitor = config["overload_manager"]["resource_monitors"][0]

    assert _filters(config)["envoy.filters.http.buffer"]["max_request_bytes"] == 4096
    assert policy["allow_origin_string_match"] == [
        {"exact": "https://a.example"},
        {"safe_regex": {"regex": ".*"}},
    ]
    assert monitor["typed_config"]["max_active_downstream_connections"] == 77


def test_lua_knows_the_accepted_body_fields_of_every_body_method() -> None:
    scripts = _filters(_render())["envoy.filters.http.lua"]["source_codes"]
    lua = scripts["rest_request.lua"]["inline_string"]

    for method in rest_api():
        if method.body == "*":
            assert method.lua_path_pattern in lua.replace("\\\\", "\\")
    assert '["phoneNumber"] = true' in lua
    assert '["phone_number"] = true' in lua


def test_missing_generated_files_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(GatewayConfigError, match="does not exist; generate it"):
        render_gateway_config(_context(descriptor_path=tmp_path / "absent.pb"))
    with pytest.raises(GatewayConfigError, match="cake-codegen"):
        check_files(_context(openapi_path=tmp_path / "absent.json"))
    with pytest.raises(GatewayConfigError, match=r"served at /docs/swagger-ui-bundle\.js"):
        check_files(_context(swagger_ui_dir=tmp_path))


def test_docs_files_are_get_only_routes_with_their_own_policy() -> None:
    context = _context()
    routes = {route["name"]: route for route in _routes(_render())}
    header_mutation = _filters(_render())["envoy.filters.http.header_mutation"]
    global_policy = {
        m["append"]["header"]["key"]: m["append"]["header"]["value"]
        for m in header_mutation["mutations"]["response_mutations"]
        if "append" in m
    }["content-security-policy"]

    assert global_policy == "default-src 'none'; frame-ancestors 'none'"
    for docs_file in context.docs_files:
        route = routes[f"docs {docs_file.path}"]
        assert route["match"]["path"] == docs_file.path
        assert route["match"]["headers"] == [{"name": ":method", "string_match": {"exact": "GET"}}]
        assert route["direct_response"]["body"] == {"filename": str(docs_file.filename)}
        assert docs_file.filename.is_file()
        per_route = route["typed_per_filter_config"]["envoy.filters.http.header_mutation"]
        (mutation,) = per_route["mutations"]["response_mutations"]
        assert mutation["append"]["header"] == {
            "key": "content-security-policy",
            "value": DOCS_CONTENT_SECURITY_POLICY,
        }
    # Nothing on the page may come from elsewhere: the policy names no other origin.
    assert "http" not in DOCS_CONTENT_SECURITY_POLICY
    page = (context.docs_pages_dir / "index.html").read_text()
    assert "http://" not in page and "https://" not in page


def test_descriptor_without_a_routed_service_is_rejected(tmp_path: Path) -> None:
    from google.protobuf import descriptor_pb2

    empty = tmp_path / "empty.pb"
    empty.write_bytes(descriptor_pb2.FileDescriptorSet().SerializeToString())
    with pytest.raises(GatewayConfigError, match=r"has no service cake\.auth\.v1\.AuthService"):
        render_gateway_config(_context(descriptor_path=empty))


# -- settings ----------------------------------------------------------------------------------


def test_default_profile_has_cakes_limits_and_bench_raises_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("PROFILE", "RATE_LIMIT_PER_MINUTE", "AUTH_RATE_LIMIT_PER_MINUTE"):
        monkeypatch.delenv(f"CAKE_GATEWAY_{name}", raising=False)
    assert GatewaySettings().rate_limits == (100, 20)

    monkeypatch.setenv("CAKE_GATEWAY_PROFILE", "bench")
    bench_all, bench_auth = GatewaySettings().rate_limits
    assert bench_all >= 1_000_000
    assert bench_auth >= 1_000_000

    monkeypatch.setenv("CAKE_GATEWAY_AUTH_RATE_LIMIT_PER_MINUTE", "50")
    assert GatewaySettings().rate_limits == (bench_all, 50)


def test_the_test_stack_gateway_does_not_throttle_other_tests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CAKE_TEST_GATEWAY_PROFILE", raising=False)
    monkeypatch.delenv("CAKE_TEST_GATEWAY_RATE_LIMIT_PER_MINUTE", raising=False)
    monkeypatch.setenv("CAKE_GATEWAY_RATE_LIMIT_PER_MINUTE", "5")  # the dev profile's

    assert load_gateway_settings("test").rate_limits[0] >= 1_000_000
    assert load_gateway_settings("dev").rate_limits[0] == 5


def test_stack_settings_reach_the_context(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAKE_GATEWAY_CORS_ALLOWED_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("CAKE_GATEWAY_RATE_LIMIT_PER_MINUTE", "250")
    monkeypatch.setenv("CAKE_GATEWAY_MAX_REQUEST_BYTES", "2048")
    monkeypatch.setenv("CAKE_GATEWAY_JWKS_CACHE_SECONDS", "7")

    context = local_gateway_context(StackSettings(), gateway=GatewaySettings())

    assert context.cors_allowed_origins == ("https://a.example", "https://b.example")
    assert context.rate_limit_per_minute == 250
    assert context.max_request_bytes == 2048
    assert context.jwks_cache_seconds == 7
    assert context.jwks_uri == f"http://127.0.0.1:{context.listen_port}/.well-known/jwks.json"
    assert context.listen_address == "127.0.0.1"


# -- envoy --mode validate ---------------------------------------------------------------------


@pytest.mark.parametrize("profile", ["dev", "test"])
def test_envoy_accepts_the_local_stack_config(profile: str, tmp_path: Path) -> None:
    settings = StackSettingsForTests() if profile == "test" else StackSettings()
    context = local_gateway_context(settings, gateway=load_gateway_settings(profile))
    validate_config(write_gateway_config(context, tmp_path / "envoy.yaml"))


def test_envoy_accepts_a_config_with_dns_upstreams(tmp_path: Path) -> None:
    context = _context(
        listen_address="0.0.0.0",
        upstreams=(
            Upstream("auth", "auth.cake.svc", 50051, "/cake.auth."),
            Upstream("promotions", "promotions.cake.svc", 50051, "/cake.promotions."),
            Upstream("notifications", "notifications.cake.svc", 50051, "/cake.notifications."),
            Upstream("events", "events.cake.svc", 50051, "/cake.events."),
        ),
        xff_num_trusted_hops=1,
    )
    validate_config(write_gateway_config(context, tmp_path / "envoy.yaml"))


def test_a_service_of_several_workers_is_one_health_checked_endpoint_per_socket(
    tmp_path: Path,
) -> None:
    sockets = [tmp_path / "auth-0.sock", tmp_path / "auth-1.sock"]
    upstreams = local_upstreams(
        auth_port=17151,
        promotions_port=17152,
        events_port=17153,
        notifications_port=17155,
        auth_sockets=sockets,
    )
    config = _render(upstreams=upstreams)
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}

    endpoints = clusters["auth"]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"] for e in endpoints] == [
        {"pipe": {"path": str(socket)}} for socket in sockets
    ]
    assert clusters["auth"]["type"] == "STATIC"
    assert clusters["auth"]["lb_policy"] == "ROUND_ROBIN"
    assert clusters["auth"]["health_checks"]
    # The others keep their TCP port.
    (promotions,) = clusters["promotions"]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert promotions["endpoint"]["address"]["socket_address"]["port_value"] == 17152
    validate_config(write_gateway_config(_context(upstreams=upstreams), tmp_path / "envoy.yaml"))


# -- the stack component -----------------------------------------------------------------------


def test_stack_does_not_restart_envoy_when_the_keys_rotate(tmp_path: Path) -> None:
    """Envoy fetches the JWKS from auth while it runs: a rotated key file changes nothing
    Envoy loads, so the stack keeps it running."""
    layout = RunLayout(tmp_path, "test")
    layout.keys.mkdir(parents=True)
    layout.jwks_file.write_text('{"keys": [{"kid": "k"}]}')
    context = StackContext(
        profile="test", settings=StackSettingsForTests(), layout=layout, echo=lambda _: None
    )
    envoy = EnvoyComponent(context, events_running=lambda: False)

    assert envoy.unavailable_reason() is None
    before = envoy.fingerprint()
    layout.jwks_file.write_text('{"keys": [{"kid": "k2"}, {"kid": "k"}]}')
    assert envoy.fingerprint() == before


def test_envoy_runs_the_configured_worker_threads_and_restarts_when_they_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = RunLayout(tmp_path, "test")
    layout.keys.mkdir(parents=True)
    layout.jwks_file.write_text('{"keys": [{"kid": "k"}]}')
    context = StackContext(
        profile="test", settings=StackSettingsForTests(), layout=layout, echo=lambda _: None
    )
    envoy = EnvoyComponent(context, events_running=lambda: False)
    argv = list(envoy.command())
    assert argv[argv.index("--concurrency") + 1] == "1"  # the default
    one_thread = envoy.fingerprint()

    monkeypatch.setenv("CAKE_TEST_GATEWAY_CONCURRENCY", "2")
    argv = list(envoy.command())
    assert argv[argv.index("--concurrency") + 1] == "2"
    assert envoy.fingerprint() != one_thread  # `up` restarts a running Envoy

    for refused in ("0", "65", "many"):
        monkeypatch.setenv("CAKE_TEST_GATEWAY_CONCURRENCY", refused)
        with pytest.raises(ValidationError):
            envoy.command()


CLUSTERS_PAGE = """\
auth::observability_name::auth
auth::127.0.0.1:17151::cx_active::1
auth::127.0.0.1:17151::health_flags::healthy
promotions::127.0.0.1:17152::health_flags::/failed_active_hc
promotions::[::1]:17152::health_flags::healthy
events_unchecked::127.0.0.1:17153::health_flags::healthy
"""
STATS_PAGE = """\
cluster.auth.health_check.success: 12
cluster.promotions.health_check.success: 3
"""


def test_envoy_admin_pages_are_read_per_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What wait_routing decides on: flags per cluster (every host, IPv6 ones too) and the
    health-check successes, parsed from the admin's text pages."""
    from cake_devtools.stack import envoy as envoy_module

    pages = {"/clusters": CLUSTERS_PAGE, "/stats": STATS_PAGE}

    def fake_get(url: str) -> tuple[int, str]:
        path = "/" + url.split("/", 3)[3].split("?", maxsplit=1)[0]
        return 200, pages[path]

    monkeypatch.setattr(envoy_module, "http_get", fake_get)
    layout = RunLayout(tmp_path, "test")
    context = StackContext(
        profile="test", settings=StackSettingsForTests(), layout=layout, echo=lambda _: None
    )
    envoy = EnvoyComponent(context, events_running=lambda: False)

    assert envoy.health_flags() == {
        "auth": "healthy",
        "promotions": "/failed_active_hc,healthy",
        "events_unchecked": "healthy",
    }
    assert envoy.health_check_successes() == {"auth": 12, "promotions": 3}
    # No health check succeeds after the call (the counters stand still) and promotions has
    # an unhealthy host: the wait gives up at its deadline and says what it saw.
    with pytest.raises(StackError, match="'promotions': '/failed_active_hc,healthy'"):
        envoy.wait_routing(["auth", "promotions"], deadline=time.monotonic() + 0.3)
    # Once each cluster had a success after the call and all its hosts are healthy, it returns.
    successes = iter([STATS_PAGE, STATS_PAGE.replace("12", "13").replace(": 3", ": 4")])
    pages["/clusters"] = CLUSTERS_PAGE.replace("/failed_active_hc", "healthy")

    def fake_get_later(url: str) -> tuple[int, str]:
        if "/stats" in url:
            return 200, next(successes, pages["/stats"].replace("12", "13").replace(": 3", ": 4"))
        return fake_get(url)

    monkeypatch.setattr(envoy_module, "http_get", fake_get_later)
    envoy.wait_routing(["auth", "promotions"], deadline=time.monotonic() + 5)
