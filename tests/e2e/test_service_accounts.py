"""Service accounts through the real stack: ``POST /oauth/token`` at the gateway (form body,
HTTP Basic or body credentials, RFC 6749 errors), the gRPC equivalent through the gateway and
straight to auth, and per-RPC access on every service for a service token (allowed where its
scope is declared, refused on user and admin RPCs), then disabling the account."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import grpc
import httpx
import jwt
import pytest
from cake.auth.v1 import auth_pb2, auth_pb2_grpc, oauth_pb2
from cake.events.v1 import admin_pb2, admin_pb2_grpc
from cake.promotions.v1 import promotions_pb2, promotions_pb2_grpc
from cake_devtools.stack import Stack

pytestmark = pytest.mark.e2e

CONTACTS = "users:read-contacts"
FORM = {"content-type": "application/x-www-form-urlencoded"}


def _cake_auth(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **stack.service_environment()["auth"]}
    return subprocess.run(
        [sys.executable, "-m", "cake_auth", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _create(stack: Stack, *scopes: str) -> tuple[str, str]:
    name = f"svc-{uuid.uuid4().hex[:10]}"
    scope_args = [arg for scope in scopes for arg in ("--scope", scope)]
    result = _cake_auth(stack, "create-service-account", name, *scope_args)
    assert result.returncode == 0, result.stderr
    printed = dict(
        line.split("=", 1) for line in result.stdout.splitlines() if line.startswith("client_")
    )
    return printed["client_id"], printed["client_secret"]


@pytest.fixture(scope="module")
def client(full_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=full_stack.gateway_url, timeout=30) as http:
        yield http


@pytest.fixture(scope="module")
def account(full_stack: Stack) -> tuple[str, str]:
    return _create(full_stack, CONTACTS)


@pytest.fixture(scope="module")
def user(client: httpx.Client) -> tuple[str, str]:
    """A registered user: (id, access token)."""
    tag = uuid.uuid4().hex[:10]
    registered = client.post(
        "/auth/register",
        json={
            "fullname": "Svc Test",
            "username": f"svc_{tag}",
            "email": f"svc_{tag}@example.com",
            "phone": "+849" + str(uuid.uuid4().int)[:9],
            "password": "service-pass-1",
            "birthday": "1990-01-01",
        },
    )
    assert registered.status_code == 201, registered.text
    body = registered.json()
    return body["user"]["id"], body["access_token"]


def _bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_token_endpoint_with_basic_and_with_body_credentials(
    client: httpx.Client, account: tuple[str, str]
) -> None:
    client_id, secret = account
    by_basic = client.post(
        "/oauth/token",
        data={"grant_type": "client_credentials", "scope": CONTACTS},
        auth=(client_id, secret),
    )
    assert by_basic.status_code == 200, by_basic.text
    assert by_basic.headers["cache-control"] == "no-store"
    body = by_basic.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 300
    assert body["scope"] == CONTACTS
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert (claims["role"], claims["sub"], claims["scope"]) == ("service", client_id, CONTACTS)

    by_body = client.post(
        "/oauth/token",
        content=f"grant_type=client_credentials&client_id={client_id}&client_secret={secret}",
        headers=FORM,
    )
    assert by_body.status_code == 200, by_body.text
    assert by_body.json()["scope"] == CONTACTS


@pytest.mark.parametrize(
    ("data", "basic", "status", "error"),
    [
        ({"grant_type": "client_credentials"}, "wrong", 401, "invalid_client"),
        ({"grant_type": "client_credentials"}, None, 401, "invalid_client"),
        ({"grant_type": "password"}, "right", 400, "unsupported_grant_type"),
        ({}, "right", 400, "invalid_request"),
        ({"grant_type": "client_credentials", "scope": "admin"}, "right", 400, "invalid_scope"),
        (
            {"grant_type": "client_credentials", "scope": 'x"\\'},
            "right",
            400,
            "invalid_scope",
        ),
    ],
)
def test_token_errors_are_rfc_6749_json(
    client: httpx.Client,
    account: tuple[str, str],
    data: dict[str, str],
    basic: str | None,
    status: int,
    error: str,
) -> None:
    client_id, secret = account
    auth = None if basic is None else (client_id, secret if basic == "right" else "wrong")
    response = client.post("/oauth/token", data=data, auth=auth)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error
    assert isinstance(body["error_description"], str) and body["error_description"]
    assert response.headers["cache-control"] == "no-store"
    if status == 401:
        assert response.headers["www-authenticate"].startswith("Basic")


def test_a_json_body_is_refused_with_invalid_request(
    client: httpx.Client, account: tuple[str, str]
) -> None:
    client_id, secret = account
    response = client.post(
        "/oauth/token",
        json={"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_request"


def _token(client: httpx.Client, client_id: str, secret: str) -> str:
    response = client.post(
        "/oauth/token", data={"grant_type": "client_credentials"}, auth=(client_id, secret)
    )
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


def test_service_token_reads_contacts_and_nothing_a_user_or_admin_may(
    client: httpx.Client, full_stack: Stack, account: tuple[str, str], user: tuple[str, str]
) -> None:
    user_id, user_token = user
    token = _token(client, *account)
    contacts = client.get(f"/auth/users/{user_id}/contacts", headers=_bearer(token))
    assert contacts.status_code == 200, contacts.text
    assert contacts.json()["email"].startswith("svc_")
    # A user may not read another's contacts.
    refused = client.get(f"/auth/users/{user_id}/contacts", headers=_bearer(user_token))
    assert refused.status_code == 403

    other = _token(client, *_create(full_stack, "promotions:read"))
    lacking = client.get(f"/auth/users/{user_id}/contacts", headers=_bearer(other))
    assert lacking.status_code == 403
    assert lacking.json()["details"][0]["reason"] == "INSUFFICIENT_SCOPE"

    for method, path in (
        ("GET", "/auth/profile"),
        ("GET", "/promotions/my-vouchers"),
        ("GET", "/promotions/eligibility"),
        ("POST", "/promotions/track-first-login"),
        ("GET", "/admin/events/queue-stats"),
        ("POST", "/admin/users/1/end-sessions"),
    ):
        response = client.request(
            method, path, headers=_bearer(token), json={} if method == "POST" else None
        )
        assert response.status_code == 403, (path, response.text)


def test_grpc_token_and_access_straight_and_through_the_gateway(
    full_stack: Stack, account: tuple[str, str], user: tuple[str, str]
) -> None:
    environment = full_stack.service_environment()
    user_id = int(user[0])
    targets = {
        "gateway": full_stack.gateway_url.removeprefix("http://"),
        "auth": f"127.0.0.1:{environment['auth']['CAKE_AUTH_GRPC_PORT']}",
    }
    for name, target in targets.items():
        with grpc.insecure_channel(target) as channel:
            auth = auth_pb2_grpc.AuthServiceStub(channel)
            issued = auth.Token(
                oauth_pb2.TokenRequest(
                    grant_type="client_credentials",
                    client_id=account[0],
                    client_secret=account[1],
                ),
                timeout=10,
            )
            metadata = (("authorization", f"Bearer {issued.access_token}"),)
            contacts = auth.GetUserContacts(
                oauth_pb2.GetUserContactsRequest(user_id=user_id), metadata=metadata, timeout=10
            )
            assert contacts.user_id == user_id, name
            with pytest.raises(grpc.RpcError) as refused:
                auth.GetProfile(auth_pb2.GetProfileRequest(), metadata=metadata, timeout=10)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
    direct = {
        "promotions": lambda channel, metadata: promotions_pb2_grpc.PromotionsServiceStub(
            channel
        ).ListMyVouchers(promotions_pb2.ListMyVouchersRequest(), metadata=metadata, timeout=10),
        "events": lambda channel, metadata: admin_pb2_grpc.EventAdminServiceStub(
            channel
        ).GetQueueStats(admin_pb2.GetQueueStatsRequest(), metadata=metadata, timeout=10),
    }
    for name, call in direct.items():
        target = f"127.0.0.1:{environment[name][f'CAKE_{name.upper()}_GRPC_PORT']}"
        with grpc.insecure_channel(target) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                call(channel, metadata)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, name


def test_disabling_revokes_the_tokens_on_every_service(
    client: httpx.Client, full_stack: Stack, user: tuple[str, str]
) -> None:
    client_id, secret = _create(full_stack, CONTACTS)
    token = _token(client, client_id, secret)
    path = f"/auth/users/{user[0]}/contacts"
    assert client.get(path, headers=_bearer(token)).status_code == 200
    disabled = _cake_auth(full_stack, "disable-service-account", client_id)
    assert disabled.returncode == 0, disabled.stderr
    deadline = time.monotonic() + 1.0
    while (response := client.get(path, headers=_bearer(token))).status_code == 200:
        assert time.monotonic() < deadline, "revoked service token still accepted"
        time.sleep(0.05)
    assert response.status_code == 401
    # The other services refuse it as revoked too (not merely for lacking a role).
    environment = full_stack.service_environment()
    target = f"127.0.0.1:{environment['promotions']['CAKE_PROMOTIONS_GRPC_PORT']}"
    with grpc.insecure_channel(target) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            promotions_pb2_grpc.PromotionsServiceStub(channel).ListMyVouchers(
                promotions_pb2.ListMyVouchersRequest(),
                metadata=(("authorization", f"Bearer {token}"),),
                timeout=10,
            )
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    again = client.post(
        "/oauth/token", data={"grant_type": "client_credentials"}, auth=(client_id, secret)
    )
    assert (again.status_code, again.json()["error"]) == (401, "invalid_client")
