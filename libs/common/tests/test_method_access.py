"""Per-RPC access rules read from the contracts (``cake.access.v1.access``) and what they let
each kind of token do (pure rules; the interceptor's wiring is tested over real channels in
the services' and end-to-end tests)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from cake.auth.v1 import auth_pb2
from cake.events.v1 import admin_pb2, health_pb2
from cake_common.grpc_server.auth import MethodAccess, method_access
from cake_common.jwt import Principal

_EXPIRES = datetime(2030, 1, 1, tzinfo=UTC)
# The rules come from the generated descriptors a server imports with its servicers.
_CONTRACTS = (auth_pb2, admin_pb2, health_pb2)


def _user(role: str = "user") -> Principal:
    return Principal(user_id=7, role=role, jti="j", expires_at=_EXPIRES, session_id="s")


def _service(*scopes: str) -> Principal:
    return Principal(
        user_id=0,
        role="service",
        jti="j",
        expires_at=_EXPIRES,
        session_id="svc-1",
        client_id="notifications",
        scopes=frozenset(scopes),
    )


def test_the_contracts_declare_each_kind_of_access() -> None:
    assert method_access("/cake.auth.v1.AuthService/Login").public
    assert method_access("/cake.auth.v1.AuthService/Token").public
    assert method_access("/cake.auth.v1.AuthService/RefreshToken").token_optional
    assert method_access("/cake.events.v1.SystemHealthService/GetSystemHealth").public
    profile = method_access("/cake.auth.v1.AuthService/GetProfile")
    assert (profile.declared, profile.roles) == (True, {"user", "admin"})
    assert method_access("/cake.events.v1.EventAdminService/ReplayEvent").roles == {"admin"}
    contacts = method_access("/cake.auth.v1.AuthService/GetUserContacts")
    assert (contacts.roles, contacts.scopes) == ({"admin"}, {"users:read-contacts"})


def test_an_undeclared_or_unknown_method_admits_users_and_admins_only() -> None:
    unknown = method_access("/no.such.Service/Method")
    assert not unknown.declared and not unknown.public
    assert unknown.allows(_user()) and unknown.allows(_user("admin"))
    assert not unknown.allows(_service("users:read-contacts"))


@pytest.mark.parametrize(
    ("method", "principal", "allowed", "reason"),
    [
        ("GetUserContacts", _service("users:read-contacts"), True, None),
        ("GetUserContacts", _service("users:read-contacts", "x:y"), True, None),
        ("GetUserContacts", _service("x:y"), False, "INSUFFICIENT_SCOPE"),
        ("GetUserContacts", _service(), False, "INSUFFICIENT_SCOPE"),
        ("GetUserContacts", _user("admin"), True, None),
        ("GetUserContacts", _user(), False, "ADMIN_ROLE_REQUIRED"),
        ("GetProfile", _service("users:read-contacts"), False, "ROLE_NOT_ALLOWED"),
        ("GetProfile", _user(), True, None),
        ("EndUserSessions", _service("users:read-contacts"), False, "ADMIN_ROLE_REQUIRED"),
        ("EndUserSessions", _user(), False, "ADMIN_ROLE_REQUIRED"),
    ],
)
def test_roles_and_scopes(method: str, principal: Principal, allowed: bool, reason: str) -> None:
    access = method_access(f"/cake.auth.v1.AuthService/{method}")
    assert access.allows(principal) is allowed
    if not allowed:
        assert access.refusal(principal).reason == reason


def test_a_scope_never_stands_in_for_a_role() -> None:
    # A user token that somehow carried scopes is still judged by its role alone.
    scoped_user = Principal(
        user_id=7,
        role="user",
        jti="j",
        expires_at=_EXPIRES,
        session_id="s",
        scopes=frozenset({"users:read-contacts"}),
    )
    assert not MethodAccess(
        roles=frozenset({"admin"}), scopes=frozenset({"users:read-contacts"})
    ).allows(scoped_user)
