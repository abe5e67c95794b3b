"""OIDC discovery and the JWKS through the gateway, and a signing-key rotation that the running
Envoy picks up by itself (remote JWKS with a cache) — no gateway restart."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest
from cake_auth.adapters.signing_keys import (
    JWKS_FILENAME,
    Es256TokenIssuer,
    generate_key_pair,
)
from cake_auth.settings import AuthSettings
from cake_devtools.stack import Stack
from cake_devtools.stack.envoy import load_gateway_settings
from cake_devtools.stack.settings import StackSettingsForTests

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def client(full_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=full_stack.gateway_url, timeout=30) as http:
        yield http


def _register(client: httpx.Client) -> dict[str, object]:
    tag = uuid.uuid4().hex[:10]
    response = client.post(
        "/auth/register",
        json={
            "fullname": "Rotation Test",
            "username": f"rot_{tag}",
            "email": f"rot_{tag}@example.com",
            "phone": "+849" + str(uuid.uuid4().int)[:9],
            "password": "rotation-pass-1",
            "birthday": "1990-01-01",
        },
    )
    assert response.status_code == 201, response.text
    body: dict[str, object] = response.json()
    return body


def test_discovery_document_names_the_gateways_endpoints(
    client: httpx.Client, full_stack: Stack
) -> None:
    response = client.get("/.well-known/openid-configuration")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    document = response.json()
    base = full_stack.gateway_url
    assert document["issuer"] == AuthSettings.model_fields["jwt_issuer"].default
    assert document["jwks_uri"] == f"{base}/.well-known/jwks.json"
    assert document["token_endpoint"] == f"{base}/oauth/token"
    assert document["grant_types_supported"] == ["client_credentials"]
    assert document["token_endpoint_auth_methods_supported"] == [
        "client_secret_basic",
        "client_secret_post",
    ]
    assert document["id_token_signing_alg_values_supported"] == ["ES256"]
    assert "users:read-contacts" in document["scopes_supported"]
    assert document["response_types_supported"] == []


def test_the_jwks_verifies_a_login_token(client: httpx.Client) -> None:
    token = str(_register(client)["access_token"])
    jwks = client.get("/.well-known/jwks.json")
    assert jwks.status_code == 200
    keys = jwks.json()["keys"]
    assert keys and all(set(key) == {"kty", "crv", "x", "y", "kid", "use", "alg"} for key in keys)
    kid = jwt.get_unverified_header(token)["kid"]
    (key,) = [key for key in keys if key["kid"] == kid]
    claims = jwt.decode(
        token,
        jwt.PyJWK(key).key,
        algorithms=["ES256"],
        audience=AuthSettings.model_fields["jwt_audience"].default,
    )
    assert claims["role"] == "user"


def _envoy_uptime() -> int:
    admin = f"http://127.0.0.1:{StackSettingsForTests().envoy_admin_port}/server_info"
    return int(httpx.get(admin, timeout=5).json()["uptime_current_epoch"].rstrip("s"))


def test_a_new_signing_key_is_accepted_at_the_edge_without_restarting_envoy(
    client: httpx.Client, full_stack: Stack, tmp_path: Path
) -> None:
    cache_seconds = load_gateway_settings("test").jwks_cache_seconds
    user_id = int(str(_register(client)["user"]["id"]))  # type: ignore[index]
    published = full_stack.run_dir / "keys" / JWKS_FILENAME
    original = published.read_bytes()
    new_key = generate_key_pair(tmp_path)
    defaults = AuthSettings.model_fields
    token = (
        Es256TokenIssuer(
            new_key,
            issuer=defaults["jwt_issuer"].default,
            audience=defaults["jwt_audience"].default,
            ttl_seconds=300,
        )
        .issue(user_id, "user")
        .token
    )
    profile = {"authorization": f"Bearer {token}"}
    # Not published yet: refused.
    assert client.get("/auth/profile", headers=profile).status_code == 401

    uptime_before, started = _envoy_uptime(), time.monotonic()
    # Step 1 of a rotation: the new public key first, the old ones kept (what
    # `cake-auth gen-keys` writes), replaced atomically like a ConfigMap update.
    merged = {"keys": [*json.loads((tmp_path / JWKS_FILENAME).read_text())["keys"]]}
    merged["keys"] += json.loads(original)["keys"]
    staged = published.with_suffix(".rotating")
    staged.write_text(json.dumps(merged))
    staged.replace(published)
    try:
        deadline = time.monotonic() + cache_seconds + 5
        while (answer := client.get("/auth/profile", headers=profile)).status_code != 200:
            assert answer.status_code == 401, answer.text
            assert time.monotonic() < deadline, "the new key is still refused"
            time.sleep(0.2)
        assert answer.json()["id"] == str(user_id)
        accepted_after = time.monotonic() - started
        # The same Envoy process (its uptime kept counting) fetched the new key set.
        assert _envoy_uptime() >= uptime_before + int(accepted_after) - 1
        assert accepted_after <= cache_seconds + 5
    finally:
        published.write_bytes(original)
