"""Service accounts against real PostgreSQL and Redis: the ``cake-auth`` commands, the
client credentials grant over gRPC (fields, form body as the gateway sends it, HTTP Basic),
per-RPC access for service tokens (allowed and refused), disabling and rotation."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import subprocess
import sys
import uuid
from typing import Any

import grpc
import jwt
import pytest
from cake.auth.v1 import auth_pb2, oauth_pb2
from cake.events.v1 import payloads_pb2, registry
from cake_auth.bootstrap import open_service_accounts
from cake_auth.domain.service_accounts import parse_scopes
from cake_common.errors import AlreadyExists
from google.api import httpbody_pb2

pytestmark = pytest.mark.integration

CONTACTS = "users:read-contacts"


def _name() -> str:
    return f"svc-{uuid.uuid4().hex[:12]}"


async def _create(auth: Any, *scopes: str, name: str | None = None) -> tuple[str, str]:
    name = name or _name()
    async with open_service_accounts(auth.settings) as accounts:
        created = await accounts.create(name, parse_scopes(scopes))
    return created.client_id, created.client_secret


async def _token(auth: Any, client_id: str, secret: str, scope: str = "") -> str:
    response = await auth.stub.Token(
        oauth_pb2.TokenRequest(
            grant_type="client_credentials",
            client_id=client_id,
            client_secret=secret,
            scope=scope,
        )
    )
    token: str = response.access_token
    return token


def _claims(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def _form(body: str, content_type: str = "application/x-www-form-urlencoded") -> Any:
    return oauth_pb2.TokenRequest(
        form=httpbody_pb2.HttpBody(content_type=content_type, data=body.encode())
    )


def _basic(client_id: str, secret: str) -> tuple[tuple[str, str], ...]:
    encoded = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    return (("authorization", f"Basic {encoded}"),)


def _cake_auth(
    auth: Any, *args: str, redis_url: str | None = None
) -> subprocess.CompletedProcess[str]:
    settings = auth.settings
    env = {
        **os.environ,
        "CAKE_AUTH_DATABASE_URL": settings.database_url.get_secret_value(),
        "CAKE_AUTH_REDIS_URL": redis_url or settings.redis_url.get_secret_value(),
        "CAKE_AUTH_REDIS_KEY_PREFIX": settings.redis_key_prefix,
    }
    return subprocess.run(
        [sys.executable, "-m", "cake_auth", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _printed(output: str, key: str) -> str:
    for line in output.splitlines():
        if line.startswith(f"{key}="):
            return line.partition("=")[2]
    raise AssertionError(f"{key} not printed: {output!r}")


async def test_the_command_prints_credentials_once_and_refuses_an_existing_name(
    auth: Any, database: Any
) -> None:
    name = _name()
    result = await asyncio.to_thread(
        _cake_auth, auth, "create-service-account", name, "--scope", CONTACTS, "--scope", "x:y"
    )
    assert result.returncode == 0, result.stderr
    assert _printed(result.stdout, "client_id") == name
    secret = _printed(result.stdout, "client_secret")
    assert len(secret) >= 40

    async with database.connect() as connection:
        stored = (
            await connection.exec_driver_sql(
                "SELECT secret_hash, scopes FROM service_accounts WHERE client_id = %s", (name,)
            )
        ).one()
    assert secret not in stored.secret_hash
    assert sorted(stored.scopes) == [CONTACTS, "x:y"]
    async with database.connect() as connection:
        payloads = (
            await connection.exec_driver_sql(
                "SELECT payload FROM outbox WHERE event_type = %s",
                (registry.SECURITY_AUDIT.name,),
            )
        ).scalars()
        entries = [payloads_pb2.SecurityAudit.FromString(payload) for payload in payloads]
    audited = [entry for entry in entries if entry.details.get("client_id") == name]
    assert [(entry.type, entry.details["scope"]) for entry in audited] == [
        ("SERVICE_ACCOUNT_CREATED", f"{CONTACTS} x:y")
    ]

    again = await asyncio.to_thread(
        _cake_auth, auth, "create-service-account", name, "--scope", CONTACTS
    )
    assert again.returncode == 1
    assert "already exists" in again.stderr and "--rotate-secret" in again.stderr
    # The first secret still works: the failed run changed nothing.
    claims = _claims(await _token(auth, name, secret))
    assert claims["role"] == "service"

    bad = await asyncio.to_thread(_cake_auth, auth, "create-service-account", "X!", "--scope", "a")
    assert bad.returncode == 2
    assert "name" in bad.stderr


async def test_a_token_carries_role_service_the_scopes_and_a_short_lifetime(auth: Any) -> None:
    client_id, secret = await _create(auth, CONTACTS, "notify:send")
    response = await auth.stub.Token(
        oauth_pb2.TokenRequest(
            grant_type="client_credentials", client_id=client_id, client_secret=secret
        )
    )
    assert response.token_type == "Bearer"
    assert auth.counter("cake_auth_service_tokens_total", result="issued") >= 1
    assert response.expires_in == auth.settings.service_token_ttl_seconds == 300
    assert response.scope == f"notify:send {CONTACTS}"
    claims = _claims(response.access_token)
    assert claims["role"] == "service"
    assert claims["sub"] == claims["client_id"] == client_id
    assert set(claims["scope"].split()) == {CONTACTS, "notify:send"}
    assert claims["exp"] - claims["iat"] == 300

    narrowed = await auth.stub.Token(
        oauth_pb2.TokenRequest(
            grant_type="client_credentials",
            client_id=client_id,
            client_secret=secret,
            scope=CONTACTS,
        )
    )
    assert narrowed.scope == CONTACTS
    assert _claims(narrowed.access_token)["scope"] == CONTACTS


async def test_form_body_and_basic_authentication(auth: Any) -> None:
    client_id, secret = await _create(auth, CONTACTS)
    by_form = await auth.stub.Token(
        _form(f"grant_type=client_credentials&client_id={client_id}&client_secret={secret}")
    )
    assert _claims(by_form.access_token)["sub"] == client_id
    by_basic = await auth.stub.Token(
        _form("grant_type=client_credentials&scope=users%3Aread-contacts"),
        metadata=_basic(client_id, secret),
    )
    assert by_basic.scope == CONTACTS


_GRANT = "grant_type=client_credentials"
_CLIENT = "client_id={id}&client_secret={secret}"


@pytest.mark.parametrize(
    ("request_", "basic", "code", "reason"),
    [
        (f"grant_type=password&{_CLIENT}", False, "INVALID_ARGUMENT", "unsupported_grant_type"),
        (_CLIENT, False, "INVALID_ARGUMENT", "invalid_request"),
        (
            f"{_GRANT}&client_id={{id}}&client_secret=wrong",
            False,
            "UNAUTHENTICATED",
            "invalid_client",
        ),
        (
            f"{_GRANT}&client_id=nobody-here&client_secret=x",
            False,
            "UNAUTHENTICATED",
            "invalid_client",
        ),
        (_GRANT, False, "UNAUTHENTICATED", "invalid_client"),
        (f"{_GRANT}&{_CLIENT}&scope=admin", False, "INVALID_ARGUMENT", "invalid_scope"),
        (f"{_GRANT}&{_CLIENT}&scope=B%21D", False, "INVALID_ARGUMENT", "invalid_scope"),
        (f"{_GRANT}&{_GRANT}&{_CLIENT}", False, "INVALID_ARGUMENT", "invalid_request"),
        (f"{_GRANT}&client_secret={{secret}}", True, "INVALID_ARGUMENT", "invalid_request"),
    ],
)
async def test_bad_requests_get_rfc_6749_errors(
    auth: Any, request_: str, basic: bool, code: str, reason: str
) -> None:
    client_id, secret = await _create(auth, CONTACTS)
    body = request_.format(id=client_id, secret=secret)
    metadata = _basic(client_id, secret) if basic else ()
    before = auth.counter("cake_auth_service_tokens_total", result=reason)
    error = await auth.failure(auth.stub.Token(_form(body), metadata=metadata))
    assert (error.code.name, error.reason) == (code, reason)
    assert auth.counter("cake_auth_service_tokens_total", result=reason) == before + 1


async def test_a_json_body_is_refused_and_a_bad_basic_header_is_invalid_client(
    auth: Any,
) -> None:
    error = await auth.failure(
        auth.stub.Token(_form('{"grant_type":"client_credentials"}', "application/json"))
    )
    assert error.reason == "invalid_request"
    error = await auth.failure(
        auth.stub.Token(
            oauth_pb2.TokenRequest(grant_type="client_credentials"),
            metadata=(("authorization", "Basic !!!"),),
        )
    )
    assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "invalid_client")


async def test_service_tokens_call_only_what_their_scopes_allow(auth: Any) -> None:
    user = await auth.register()
    reader, reader_secret = await _create(auth, CONTACTS)
    other, other_secret = await _create(auth, "promotions:read")
    reader_token = await _token(auth, reader, reader_secret)
    other_token = await _token(auth, other, other_secret)

    contacts = await auth.stub.GetUserContacts(
        oauth_pb2.GetUserContactsRequest(user_id=user.user.id), metadata=auth.bearer(reader_token)
    )
    assert (contacts.email, contacts.phone) == (user.user.email, user.user.phone)

    # Allowed by role: an admin. Refused: a user, and a service without the scope.
    admin = await auth.stub.GetUserContacts(
        oauth_pb2.GetUserContactsRequest(user_id=user.user.id),
        metadata=auth.bearer(auth.admin_token()),
    )
    assert admin.user_id == user.user.id
    error = await auth.failure(
        auth.stub.GetUserContacts(
            oauth_pb2.GetUserContactsRequest(user_id=user.user.id),
            metadata=auth.bearer(user.access_token),
        )
    )
    assert (error.code, error.reason) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "ADMIN_ROLE_REQUIRED",
    )
    error = await auth.failure(
        auth.stub.GetUserContacts(
            oauth_pb2.GetUserContactsRequest(user_id=user.user.id),
            metadata=auth.bearer(other_token),
        )
    )
    assert (error.code, error.reason) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "INSUFFICIENT_SCOPE",
    )
    assert CONTACTS in error.message

    # User-only and admin-only RPCs refuse service tokens whatever their scopes.
    bearer = auth.bearer(reader_token)
    for call, reason in (
        (auth.stub.GetProfile(auth_pb2.GetProfileRequest(), metadata=bearer), "ROLE_NOT_ALLOWED"),
        (auth.stub.LogoutAll(auth_pb2.LogoutAllRequest(), metadata=bearer), "ROLE_NOT_ALLOWED"),
        (
            auth.stub.EndUserSessions(
                auth_pb2.EndUserSessionsRequest(user_id=user.user.id), metadata=bearer
            ),
            "ADMIN_ROLE_REQUIRED",
        ),
        (
            auth.stub.RefreshToken(auth_pb2.RefreshTokenRequest(), metadata=bearer),
            "ROLE_NOT_ALLOWED",
        ),
    ):
        error = await auth.failure(call)
        assert (error.code, error.reason) == (grpc.StatusCode.PERMISSION_DENIED, reason)

    missing = await auth.failure(
        auth.stub.GetUserContacts(
            oauth_pb2.GetUserContactsRequest(user_id=2**62), metadata=auth.bearer(reader_token)
        )
    )
    assert missing.code == grpc.StatusCode.NOT_FOUND


async def _refused_within(auth: Any, token: str, user_id: int, seconds: float = 1.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        try:
            await auth.stub.GetUserContacts(
                oauth_pb2.GetUserContactsRequest(user_id=user_id), metadata=auth.bearer(token)
            )
        except grpc.aio.AioRpcError as error:
            assert auth.rich_error(error).reason == "TOKEN_REVOKED"
            return
        assert asyncio.get_running_loop().time() < deadline, "token still accepted"
        await asyncio.sleep(0.05)


async def _audited(database: Any, client_id: str) -> list[str]:
    """The audit entry types recorded for the account, oldest first."""
    async with database.connect() as connection:
        payloads = (
            await connection.exec_driver_sql(
                "SELECT payload FROM outbox WHERE event_type = %s ORDER BY id",
                (registry.SECURITY_AUDIT.name,),
            )
        ).scalars()
        entries = [payloads_pb2.SecurityAudit.FromString(payload) for payload in payloads]
    return [entry.type for entry in entries if entry.details.get("client_id") == client_id]


async def test_disabling_refuses_new_tokens_and_revokes_the_issued_ones(
    auth: Any, database: Any
) -> None:
    user = await auth.register()
    client_id, secret = await _create(auth, CONTACTS)
    tokens = [await _token(auth, client_id, secret) for _ in range(3)]
    result = await asyncio.to_thread(_cake_auth, auth, "disable-service-account", client_id)
    assert result.returncode == 0, result.stderr
    for token in tokens:
        await _refused_within(auth, token, user.user.id)
    error = await auth.failure(_token(auth, client_id, secret))
    assert error.reason == "invalid_client"

    missing = await asyncio.to_thread(_cake_auth, auth, "disable-service-account", _name())
    assert missing.returncode == 1
    assert await _audited(database, client_id) == [
        "SERVICE_ACCOUNT_CREATED",
        "SERVICE_ACCOUNT_DISABLED",
    ]


async def test_rotation_replaces_the_secret_and_revokes_old_tokens(
    auth: Any, database: Any
) -> None:
    user = await auth.register()
    client_id, old_secret = await _create(auth, CONTACTS)
    old_token = await _token(auth, client_id, old_secret)
    async with open_service_accounts(auth.settings) as accounts:
        rotated = await accounts.create(client_id, parse_scopes([CONTACTS]), rotate=True)
    assert not rotated.created and rotated.client_secret != old_secret
    assert await _audited(database, client_id) == [
        "SERVICE_ACCOUNT_CREATED",
        "SERVICE_ACCOUNT_SECRET_ROTATED",
    ]
    await _refused_within(auth, old_token, user.user.id)
    error = await auth.failure(_token(auth, client_id, old_secret))
    assert error.reason == "invalid_client"
    new_token = await _token(auth, client_id, rotated.client_secret)
    contacts = await auth.stub.GetUserContacts(
        oauth_pb2.GetUserContactsRequest(user_id=user.user.id), metadata=auth.bearer(new_token)
    )
    assert contacts.user_id == user.user.id


async def test_concurrent_creations_of_one_name_make_one_account(auth: Any) -> None:
    name = _name()

    async def create() -> str:
        async with open_service_accounts(auth.settings) as accounts:
            try:
                return (await accounts.create(name, parse_scopes([CONTACTS]))).client_secret
            except AlreadyExists as error:
                return repr(error)

    outcomes = await asyncio.gather(*(create() for _ in range(8)))
    secrets_ = [outcome for outcome in outcomes if not outcome.startswith("AlreadyExists")]
    assert len(secrets_) == 1, outcomes
    assert _claims(await _token(auth, name, secrets_[0]))["sub"] == name


def _dead_redis_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"  # nothing listens there once the probe closes


async def test_disable_and_rotation_change_nothing_when_the_tokens_cannot_be_revoked(
    auth: Any,
) -> None:
    user = await auth.register()
    client_id, secret = await _create(auth, CONTACTS)
    token = await _token(auth, client_id, secret)
    dead = _dead_redis_url()
    for args in (
        ("disable-service-account", client_id),
        ("create-service-account", client_id, "--scope", CONTACTS, "--rotate-secret"),
    ):
        result = await asyncio.to_thread(_cake_auth, auth, *args, redis_url=dead)
        assert result.returncode == 1, result.stdout
        assert "nothing was changed, run it again" in result.stderr
        assert "client_secret=" not in result.stdout
    # The account is as it was: the old secret still works, the old token too.
    await _token(auth, client_id, secret)
    contacts = await auth.stub.GetUserContacts(
        oauth_pb2.GetUserContactsRequest(user_id=user.user.id), metadata=auth.bearer(token)
    )
    assert contacts.user_id == user.user.id
    # Once Redis answers, running it again does it.
    result = await asyncio.to_thread(_cake_auth, auth, "disable-service-account", client_id)
    assert result.returncode == 0, result.stderr
    await _refused_within(auth, token, user.user.id)


async def test_a_secret_from_a_file_is_registered_once_and_a_new_one_rotates(
    auth: Any, tmp_path: Any
) -> None:
    """What a deployment's Job runs at every release (k8s: auth-service-accounts)."""
    name = _name()
    secret_file = tmp_path / "client-secret"
    secret_file.write_text("s" * 43 + "\n")
    args = ("create-service-account", name, "--scope", CONTACTS, "--rotate-secret")
    first = await asyncio.to_thread(_cake_auth, auth, *args, "--secret-file", str(secret_file))
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("created") and "client_secret=" not in first.stdout
    token = await _token(auth, name, "s" * 43)
    assert _claims(token)["role"] == "service"

    # Run again with the same file: unchanged, and the token it held still works.
    again = await asyncio.to_thread(_cake_auth, auth, *args, "--secret-file", str(secret_file))
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("unchanged:")
    user = await auth.register()
    contacts = await auth.stub.GetUserContacts(
        oauth_pb2.GetUserContactsRequest(user_id=user.user.id), metadata=auth.bearer(token)
    )
    assert contacts.user_id == user.user.id

    # A new secret in the file: the old secret is refused, the old token revoked.
    secret_file.write_text("t" * 43)
    rotated = await asyncio.to_thread(_cake_auth, auth, *args, "--secret-file", str(secret_file))
    assert rotated.returncode == 0, rotated.stderr
    assert rotated.stdout.startswith("rotated the secret of")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _token(auth, name, "s" * 43)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await _token(auth, name, "t" * 43)
    await _refused_within(auth, token, user.user.id)

    # A weak or missing secret file is an input error, nothing is changed.
    secret_file.write_text("too-short")
    weak = await asyncio.to_thread(_cake_auth, auth, *args, "--secret-file", str(secret_file))
    missing = await asyncio.to_thread(
        _cake_auth, auth, *args, "--secret-file", str(tmp_path / "absent")
    )
    for result in (weak, missing):
        assert result.returncode == 2, result.stdout
        assert "create-service-account failed" in result.stderr
    await _token(auth, name, "t" * 43)


async def test_contacts_of_several_users_in_one_call_for_the_scope_only(auth: Any) -> None:
    first, second = await auth.register(), await auth.register()
    reader, reader_secret = await _create(auth, CONTACTS)
    other, other_secret = await _create(auth, "promotions:read")
    bearer = auth.bearer(await _token(auth, reader, reader_secret))
    unknown = 9_000_000_000_000
    found = await auth.stub.GetUsersContacts(
        oauth_pb2.GetUsersContactsRequest(user_ids=[first.user.id, unknown, second.user.id]),
        metadata=bearer,
    )
    assert sorted((c.user_id, c.email, c.phone, c.fullname) for c in found.contacts) == sorted(
        (u.user.id, u.user.email, u.user.phone, u.user.fullname) for u in (first, second)
    )  # the unknown id is left out
    error = await auth.failure(
        auth.stub.GetUsersContacts(
            oauth_pb2.GetUsersContactsRequest(user_ids=[first.user.id]),
            metadata=auth.bearer(await _token(auth, other, other_secret)),
        )
    )
    assert (error.code, error.reason) == (grpc.StatusCode.PERMISSION_DENIED, "INSUFFICIENT_SCOPE")
    for bad in ([], [first.user.id, first.user.id], [0], list(range(1, 502))):
        error = await auth.failure(
            auth.stub.GetUsersContacts(
                oauth_pb2.GetUsersContactsRequest(user_ids=bad), metadata=bearer
            )
        )
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT, bad
