"""The security audit log through the real stack: what auth, promotions and events record
reaches the events service's append-only log, readable by admins over REST and gRPC with
filters and page tokens."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import httpx
import pytest
from cake.events.v1 import admin_pb2, admin_pb2_grpc
from cake_devtools.stack import Stack

pytestmark = pytest.mark.e2e

PASSWORD = "audit-pass-1"


def _unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def _phone() -> str:
    return "+849" + str(uuid.uuid4().int)[:9]


@pytest.fixture(scope="module")
def client(full_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=full_stack.gateway_url, timeout=30) as http:
        yield http


@pytest.fixture(scope="module")
def admin_token(create_admin: Callable[..., None], client: httpx.Client) -> str:
    username = _unique("auditadmin")
    create_admin(username, f"{username}@example.com", _phone(), PASSWORD)
    response = client.post("/auth/login", json={"account": username, "password": PASSWORD})
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


def _entries(client: httpx.Client, token: str, **params: Any) -> dict[str, Any]:
    response = client.get(
        "/admin/audit-events", params=params, headers={"authorization": f"Bearer {token}"}
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _wait_for(fetch: Callable[[], list[dict[str, Any]]], what: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 30
    while True:
        found = fetch()
        if found:
            return found
        assert time.monotonic() < deadline, f"no audit entry for {what}"
        time.sleep(0.3)


def test_security_events_of_every_service_reach_the_audit_log(
    full_stack: Stack, client: httpx.Client, admin_token: str
) -> None:
    since = (datetime.now(UTC) - timedelta(seconds=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    username = _unique("audited")
    registered = client.post(
        "/auth/register",
        json={
            "fullname": "Audited User",
            "email": f"{username}@example.com",
            "username": username,
            "phone": _phone(),
            "password": PASSWORD,
            "birthday": "1990-01-02",
        },
    )
    assert registered.status_code == 201
    user_id = registered.json()["user"]["id"]
    token = registered.json()["access_token"]
    failed = client.post("/auth/login", json={"account": username, "password": "wrong-one"})
    assert failed.status_code == 401
    assert client.post(
        "/auth/logout", json={}, headers={"authorization": f"Bearer {token}"}
    ).is_success

    failures = _wait_for(
        lambda: _entries(client, admin_token, type="LOGIN_FAILED", userId=user_id)["auditEvents"],
        "the failed login",
    )
    assert failures[0]["source"] == "auth"
    assert failures[0]["subjectUserId"] == user_id
    logouts = _wait_for(
        lambda: _entries(client, admin_token, type="LOGOUT", userId=user_id)["auditEvents"],
        "the logout",
    )
    assert logouts[0]["actorUserId"] == user_id

    # An admin action in promotions and one in events.
    now = datetime.now(UTC)
    created = client.post(
        "/promotions/campaigns",
        headers={"authorization": f"Bearer {admin_token}"},
        json={
            "name": _unique("audited campaign"),
            "startDate": (now + timedelta(days=400)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "endDate": (now + timedelta(days=401)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
    )
    assert created.status_code == 201, created.text
    campaign_id = created.json()["id"]
    retried = client.post(
        "/admin/events/retry-failed", json={}, headers={"authorization": f"Bearer {admin_token}"}
    )
    assert retried.status_code == 200
    campaigns = _wait_for(
        lambda: [
            entry
            for entry in _entries(client, admin_token, type="CAMPAIGN_CREATED", since=since)[
                "auditEvents"
            ]
            if entry["details"].get("campaign_id") == campaign_id
        ],
        "the campaign creation",
    )
    assert campaigns[0]["source"] == "promotions"

    # Page tokens walk the whole filtered log, one entry at a time, newest first.
    first = _entries(client, admin_token, userId=user_id, pageSize=1)
    assert len(first["auditEvents"]) == 1 and first["nextPageToken"]
    second = _entries(
        client, admin_token, userId=user_id, pageSize=1, pageToken=first["nextPageToken"]
    )
    assert second["auditEvents"][0]["id"] != first["auditEvents"][0]["id"]
    assert second["auditEvents"][0]["occurredAt"] <= first["auditEvents"][0]["occurredAt"]

    # The same over gRPC, straight to the events service.
    port = full_stack.service_environment()["events"]["CAKE_EVENTS_GRPC_PORT"]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        native = admin_pb2_grpc.EventAdminServiceStub(channel).ListAuditEvents(
            admin_pb2.ListAuditEventsRequest(type="LOGIN_FAILED", user_id=int(user_id)),
            metadata=(("authorization", f"Bearer {admin_token}"),),
            timeout=10,
        )
    assert [entry.type for entry in native.audit_events] == ["LOGIN_FAILED"]


def test_the_audit_log_is_for_admins_and_checks_its_input(
    client: httpx.Client, admin_token: str
) -> None:
    username = _unique("nosy")
    registered = client.post(
        "/auth/register",
        json={
            "fullname": "Nosy User",
            "email": f"{username}@example.com",
            "username": username,
            "phone": _phone(),
            "password": PASSWORD,
            "birthday": "1990-01-02",
        },
    )
    user_token = registered.json()["access_token"]
    forbidden = client.get("/admin/audit-events", headers={"authorization": f"Bearer {user_token}"})
    assert forbidden.status_code == 403
    assert client.get("/admin/audit-events").status_code == 401
    headers = {"authorization": f"Bearer {admin_token}"}
    assert client.get("/admin/audit-events?pageToken=garbage", headers=headers).status_code == 400
    assert client.get("/admin/audit-events?pageSize=5000", headers=headers).status_code == 400
    backwards = client.get(
        "/admin/audit-events?since=2026-02-01T00:00:00Z&until=2026-01-01T00:00:00Z",
        headers=headers,
    )
    assert backwards.status_code == 400


def test_the_audit_log_is_append_only(full_stack: Stack) -> None:
    import psycopg

    url = full_stack.postgres_admin_url.rsplit("/", 1)[0] + "/cake_events"
    with psycopg.connect(url, autocommit=True) as connection:
        for statement in (
            "UPDATE security_audit_events SET type = 'x'",
            "DELETE FROM security_audit_events",
            "TRUNCATE security_audit_events",
        ):
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                connection.execute(statement)
