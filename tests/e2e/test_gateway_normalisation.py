"""Every REST route, spelled the ways a client (or an attacker) may spell it, meets the same
route, limits and field checks as its canonical path, or a 404.

Through the real Envoy of the test stack: each variant of each route sends a request the
gateway must refuse on its own (an unknown JSON field or query parameter, 400) and must get
exactly the canonical path's answer. Upper-case paths match nothing (404). A second check
runs the login rate limit of a gateway with Cake's default limits through variants.
"""

from __future__ import annotations

import re
import socket
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from cake_devtools.gateway_config import GatewayContext, RestMethod, rest_api
from cake_devtools.stack import Stack
from cake_devtools.stack.envoy import GatewaySettings, local_gateway_context, run_gateway
from cake_devtools.stack.settings import StackSettingsForTests

pytestmark = pytest.mark.e2e

PATH_VALUES = {
    "id": "42",
    "user_id": "42",
    "code": "CAKE-AB12CD34",
    "event_id": "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
}


def canonical_path(method: RestMethod) -> str:
    path = method.path
    for name in method.path_params:
        path = path.replace("{" + name + "}", PATH_VALUES[name])
    return path


def _percent_encode_a_letter(path: str) -> str:
    match = re.search(r"[a-z]", path)
    assert match is not None
    index = match.start()
    return f"{path[:index]}%{ord(path[index]):02X}{path[index + 1 :]}"


def variants(path: str) -> dict[str, str]:
    """Spellings that must behave as ``path`` (first) and those that must be 404."""
    first_slash = path.index("/", 1) if path.count("/") > 1 else len(path)
    return {
        "trailing slash": f"{path}/",
        "two trailing slashes": f"{path}//",
        "leading double slash": f"/{path}",
        "repeated inner slash": path.replace("/", "//", 2).replace("//", "/", 1),
        "dot segment": f"{path[:first_slash]}/.{path[first_slash:]}",
        "dot-dot segment": f"{path[:first_slash]}/x/..{path[first_slash:]}",
        "percent-encoded letter": _percent_encode_a_letter(path),
        "percent-encoded letter and trailing slash": _percent_encode_a_letter(path) + "/",
    }


def _request(client: httpx.Client, method: RestMethod, path: str) -> httpx.Response:
    headers = {"authorization": "Bearer not-checked-before-the-field-check"}
    # An absolute URL: a path starting with `//` would otherwise be read as a host.
    url = f"{str(client.base_url).rstrip('/')}{path}"
    if method.body:
        return client.request(method.http_method, url, json={"bogusField": 1}, headers=headers)
    return client.request(method.http_method, f"{url}?bogusField=1", headers=headers)


def _outcome(response: httpx.Response) -> tuple[int, str]:
    message = response.json().get("message", "") if response.content else ""
    # The 404 and some messages quote the path as sent: compare the rest.
    return response.status_code, message


@pytest.fixture(scope="module")
def client(full_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=full_stack.gateway_url, timeout=30) as http:
        yield http


ROUTES = [m for m in rest_api() if not m.is_health]


@pytest.mark.parametrize("method", ROUTES, ids=lambda m: f"{m.http_method} {m.path}")
def test_every_spelling_of_a_route_gets_the_canonical_answer(
    client: httpx.Client, method: RestMethod
) -> None:
    path = canonical_path(method)
    expected = _outcome(_request(client, method, path))
    # The gateway itself refuses the unknown field / parameter: no service is involved.
    assert expected[0] == 400, expected

    differing = {}
    for name, variant in variants(path).items():
        got = _outcome(_request(client, method, variant))
        if got != expected:
            differing[f"{name} {variant}"] = got
    assert differing == {}

    shouted = _request(client, method, path.upper())
    assert shouted.status_code == 404, shouted.text


def test_health_spellings(client: httpx.Client) -> None:
    base = str(client.base_url).rstrip("/")
    canonical = client.get("/health")
    for variant in ("/health/", "//health", "/%68ealth", "/./health"):
        response = client.get(f"{base}{variant}")
        assert response.status_code == canonical.status_code, variant
        assert set(response.json()) == set(canonical.json()), variant
    assert client.get("/HEALTH").status_code == 404


def test_escaped_slashes_are_refused(client: httpx.Client) -> None:
    response = client.post("/auth%2Flogin", json={"account": "x", "password": "y"})
    assert response.status_code in (400, 404)


# -- limits -------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def limited_gateway(full_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    gateway = GatewaySettings(
        profile="default", rate_limit_per_minute=None, auth_rate_limit_per_minute=None
    )
    stack_settings = StackSettingsForTests(gateway_port=_free_port(), envoy_admin_port=_free_port())
    context: GatewayContext = local_gateway_context(stack_settings, gateway=gateway)
    with run_gateway(context, tmp_path_factory.mktemp("normalising-envoy")) as url:
        yield url


def test_login_spellings_share_the_login_rate_limit(limited_gateway: str) -> None:
    auth_per_minute = GatewaySettings(
        profile="default", rate_limit_per_minute=None, auth_rate_limit_per_minute=None
    ).rate_limits[1]
    spellings = ["/auth/login/", "//auth//login", "/auth/%6Cogin/", "/auth/./login//"]
    transport = httpx.HTTPTransport(local_address="127.0.0.21")
    with httpx.Client(base_url=limited_gateway, transport=transport, timeout=30) as client:
        began = time.monotonic()
        statuses = []
        for attempt in range(auth_per_minute * 2):
            response = client.post(
                f"{limited_gateway}{spellings[attempt % len(spellings)]}",
                json={"account": f"nobody_{uuid.uuid4().hex}", "password": "wrong-password"},
            )
            statuses.append(response.status_code)
            if response.status_code == 429:
                break
        elapsed = time.monotonic() - began
    assert statuses[-1] == 429, statuses
    passed = len(statuses) - 1
    assert passed <= auth_per_minute + int(elapsed * auth_per_minute / 60) + 1
    assert set(statuses[:-1]) == {401}
