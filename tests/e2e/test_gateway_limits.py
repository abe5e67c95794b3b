"""Per-client-IP rate limits with the gateway's default (Cake's) limits.

The shared test gateway does not throttle (the other end-to-end tests all come from
127.0.0.1), so this module starts a second Envoy from the same template with the default
limits, in front of the same services. Clients bind their source address on loopback
(127.0.0.1, 127.0.0.2, ...) to appear as different IPs.

The buckets refill continuously (100 per minute: one token every 0.6 s), so "the 101st
request in a minute gets 429" holds exactly when the first 101 requests take less than
0.6 s; the assertions allow for the tokens that time refills.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator

import grpc
import httpx
import pytest
from cake.promotions.v1 import promotions_pb2, promotions_pb2_grpc
from cake_devtools.gateway_config import GatewayContext
from cake_devtools.stack import Stack
from cake_devtools.stack.envoy import GatewaySettings, local_gateway_context, run_gateway
from cake_devtools.stack.settings import StackSettingsForTests

pytestmark = pytest.mark.e2e

PER_MINUTE = 100
AUTH_PER_MINUTE = 20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def limited_gateway(full_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # The defaults, whatever the developer's environment says.
    gateway = GatewaySettings(
        profile="default", rate_limit_per_minute=None, auth_rate_limit_per_minute=None
    )
    assert gateway.rate_limits == (PER_MINUTE, AUTH_PER_MINUTE)
    stack_settings = StackSettingsForTests(gateway_port=free_port(), envoy_admin_port=free_port())
    context: GatewayContext = local_gateway_context(stack_settings, gateway=gateway)
    with run_gateway(context, tmp_path_factory.mktemp("limited-envoy")) as url:
        yield url


def client_from(address: str, base_url: str) -> httpx.Client:
    return httpx.Client(
        base_url=base_url, transport=httpx.HTTPTransport(local_address=address), timeout=30
    )


def refilled(elapsed: float, per_minute: int) -> int:
    """Tokens a continuously refilled bucket may have regained in ``elapsed`` seconds."""
    return int(elapsed * per_minute / 60) + 1


def requests_until_throttled(
    client: httpx.Client, path: str, limit: int
) -> tuple[int, httpx.Response, float]:
    """Send ``GET path`` until one is throttled: (how many passed, the 429, seconds taken)."""
    began = time.monotonic()
    for sent in range(limit * 2):
        response = client.get(path)
        if response.status_code == 429:
            return sent, response, time.monotonic() - began
        assert response.status_code == 200, response.text
    raise AssertionError(f"no 429 after {limit * 2} requests")


def test_the_101st_request_of_a_minute_is_throttled_with_headers(limited_gateway: str) -> None:
    with client_from("127.0.0.10", limited_gateway) as client:
        # Envoy answers /openapi.json itself: fast requests, so time hardly refills the bucket.
        passed, throttled, elapsed = requests_until_throttled(client, "/openapi.json", PER_MINUTE)
        # The bucket is per client IP over every route: a service route is throttled too.
        service_route = client.get("/promotions/campaigns")

    print(f"\n{passed} requests passed in {elapsed:.3f}s before the first 429")
    assert PER_MINUTE <= passed <= PER_MINUTE + refilled(elapsed, PER_MINUTE)
    if elapsed < 60 / PER_MINUTE:
        assert passed == PER_MINUTE
    assert throttled.json() == {"code": 8, "message": "Too Many Requests", "details": []}
    assert throttled.headers["content-type"] == "application/json"
    assert throttled.headers["x-ratelimit-limit"] == str(PER_MINUTE)
    assert throttled.headers["x-ratelimit-remaining"] == "0"
    assert int(throttled.headers["x-ratelimit-reset"]) >= 0
    assert service_route.status_code == 429


def test_another_client_ip_has_its_own_bucket(limited_gateway: str) -> None:
    with client_from("127.0.0.1", limited_gateway) as first:
        requests_until_throttled(first, "/openapi.json", PER_MINUTE)
    with client_from("127.0.0.2", limited_gateway) as second:
        fresh = second.get("/promotions/campaigns")

    assert fresh.status_code == 200, fresh.text
    assert fresh.headers["x-ratelimit-limit"] == str(PER_MINUTE)
    assert int(fresh.headers["x-ratelimit-remaining"]) >= PER_MINUTE - 2


def test_login_and_register_share_a_stricter_bucket(limited_gateway: str) -> None:
    with client_from("127.0.0.3", limited_gateway) as client:
        began = time.monotonic()
        statuses = []
        for attempt in range(AUTH_PER_MINUTE * 2):
            # Cheap for the services: invalid registrations (400) and logins of accounts
            # that do not exist (401; a different one each time, so the per-account
            # throttle of the auth service never answers instead).
            if attempt % 2:
                response = client.post("/auth/register", json={})
            else:
                account = f"nobody_{uuid.uuid4().hex[:12]}"
                response = client.post("/auth/login", json={"account": account, "password": "x1"})
            statuses.append(response.status_code)
            if response.status_code == 429:
                break
        elapsed = time.monotonic() - began
        other_route = client.get("/promotions/campaigns")

    passed = len(statuses) - 1
    print(f"\n{passed} login/register requests passed in {elapsed:.3f}s before the first 429")
    assert statuses[-1] == 429
    assert set(statuses[:-1]) <= {400, 401}
    assert AUTH_PER_MINUTE <= passed <= AUTH_PER_MINUTE + refilled(elapsed, AUTH_PER_MINUTE)
    assert response.headers["x-ratelimit-limit"] == str(AUTH_PER_MINUTE)
    # Only login and register are that strict: the same client still reads campaigns.
    assert other_route.status_code == 200


def test_native_grpc_callers_get_resource_exhausted(limited_gateway: str) -> None:
    target = limited_gateway.removeprefix("http://")
    with client_from("127.0.0.1", limited_gateway) as client:
        requests_until_throttled(client, "/openapi.json", PER_MINUTE)
    codes = []
    with grpc.insecure_channel(target) as channel:
        stub = promotions_pb2_grpc.PromotionsServiceStub(channel)
        for _ in range(3):
            try:
                stub.ListCampaigns(promotions_pb2.ListCampaignsRequest(), timeout=10)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as error:
                codes.append(error.code())

    # The bucket may regain one token while the calls run; never more.
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 2, codes
