"""Service-account rules (pure) and the client credentials use case against in-memory fakes."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import pytest
from cake_auth.domain.service_accounts import (
    ClientCredentials,
    ServiceAccount,
    client_from_request,
    granted_scopes,
    hash_client_secret,
    parse_scopes,
    secret_matches,
)
from cake_auth.domain.tokens import AccessToken
from cake_auth.service.service_accounts import ServiceAccounts, TokenGrant
from cake_common.errors import CakeError

NOW = datetime(2026, 12, 5, tzinfo=UTC)


def test_scopes_parse_and_reject_what_cake_never_grants() -> None:
    assert parse_scopes("users:read-contacts  a.b") == {"users:read-contacts", "a.b"}
    assert parse_scopes(["x:y z", "x:y"]) == {"x:y", "z"}
    for bad in ('x"', "UPPER", "a\\b", "é"):
        with pytest.raises(ValueError, match="invalid scope"):
            parse_scopes(bad)
    with pytest.raises(ValueError, match="at most"):
        parse_scopes(" ".join(f"s{i}" for i in range(33)))


def test_requested_scopes_must_be_a_subset() -> None:
    allowed = frozenset({"a", "b"})
    assert granted_scopes("", allowed) == allowed
    assert granted_scopes("b", allowed) == {"b"}
    with pytest.raises(CakeError) as error:
        granted_scopes("a c", allowed)
    assert error.value.reason == "invalid_scope" and "c" in error.value.message


def test_secret_hash_is_not_the_secret_and_checks_in_constant_time() -> None:
    stored = hash_client_secret("s3cret")
    assert "s3cret" not in stored
    assert secret_matches("s3cret", stored) and not secret_matches("s3cres", stored)


def test_one_client_authentication_method() -> None:
    basic = ClientCredentials("svc", "pw")
    assert client_from_request(basic=basic, client_id="", client_secret="") == basic
    assert client_from_request(basic=basic, client_id="svc", client_secret="") == basic
    for client_id, secret in (("svc", "pw"), ("other", "")):
        with pytest.raises(CakeError) as both:
            client_from_request(basic=basic, client_id=client_id, client_secret=secret)
        assert both.value.reason == "invalid_request"
    with pytest.raises(CakeError) as neither:
        client_from_request(basic=None, client_id="svc", client_secret="")
    assert neither.value.reason == "invalid_client"


class _Accounts:
    def __init__(self, account: ServiceAccount) -> None:
        self.account = account

    async def get(self, client_id: str, *, for_update: bool = False) -> ServiceAccount | None:
        return self.account if client_id == self.account.client_id else None


class _Audit:
    async def security_audit(self, entry: object) -> None:
        raise AssertionError("issuing a token is not audited")


class _UnitOfWork:
    def __init__(self, accounts: _Accounts) -> None:
        self.service_accounts = accounts
        self.events = _Audit()

    async def __aenter__(self) -> _UnitOfWork:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    async def commit(self) -> None:
        return None


class _Tokens:
    def __init__(self) -> None:
        self.issued: list[tuple[str, list[str], str]] = []

    def issue_service(
        self, client_id: str, scopes: Sequence[str], *, session_id: str
    ) -> AccessToken:
        self.issued.append((client_id, list(scopes), session_id))
        return AccessToken(token="t", jti="j", expires_at=NOW, session_id=session_id)


class _Revocations:
    async def revoke_sessions(self, session_ids: Sequence[str]) -> None:
        raise AssertionError("issuing never revokes")

    async def revoke_token(self, jti: str, expires_at: datetime) -> None:
        raise AssertionError("issuing never revokes")


def _use_case(disabled: bool = False) -> tuple[ServiceAccounts, _Tokens]:
    account = ServiceAccount(
        id=1,
        client_id="notifications",
        secret_hash=hash_client_secret("pw"),
        scopes=frozenset({"users:read-contacts", "x:y"}),
        generation="svc-gen-1",
        created_at=NOW,
        disabled_at=NOW if disabled else None,
    )
    tokens = _Tokens()
    accounts = _Accounts(account)
    return (
        ServiceAccounts(
            unit_of_work=lambda: _UnitOfWork(accounts),  # type: ignore[arg-type,return-value]
            tokens=tokens,
            revocations=_Revocations(),
        ),
        tokens,
    )


async def test_issue_signs_the_granted_scopes_with_the_account_generation() -> None:
    use_case, tokens = _use_case()
    issued = await use_case.issue(
        TokenGrant(grant_type="client_credentials", basic=ClientCredentials("notifications", "pw"))
    )
    assert issued.scope == "users:read-contacts x:y"
    assert tokens.issued == [("notifications", ["users:read-contacts", "x:y"], "svc-gen-1")]


@pytest.mark.parametrize(
    ("grant", "disabled", "reason"),
    [
        (TokenGrant("client_credentials", "notifications", "wrong"), False, "invalid_client"),
        (TokenGrant("client_credentials", "nobody", "pw"), False, "invalid_client"),
        (TokenGrant("client_credentials", "BAD ID", "pw"), False, "invalid_client"),
        (TokenGrant("client_credentials", "notifications", "pw"), True, "invalid_client"),
        (TokenGrant("client_credentials", "notifications", "pw", "admin"), False, "invalid_scope"),
        (TokenGrant("password", "notifications", "pw"), False, "unsupported_grant_type"),
        (TokenGrant("", "notifications", "pw"), False, "invalid_request"),
    ],
)
async def test_refusals(grant: TokenGrant, disabled: bool, reason: str) -> None:
    use_case, tokens = _use_case(disabled)
    with pytest.raises(CakeError) as error:
        await use_case.issue(grant)
    assert error.value.reason == reason
    assert tokens.issued == []


# -- create with a given secret (a deployment's secret store) --------------------------------


class _StoredAccounts:
    """The repository's create/rotate part, in memory."""

    def __init__(self) -> None:
        self.account: ServiceAccount | None = None
        self.writes = 0

    async def get(self, client_id: str, *, for_update: bool = False) -> ServiceAccount | None:
        return self.account if self.account and self.account.client_id == client_id else None

    async def add(
        self,
        *,
        client_id: str,
        secret_hash: str,
        scopes: frozenset[str],
        generation: str,
        at: datetime,
    ) -> ServiceAccount | None:
        self.writes += 1
        self.account = ServiceAccount(1, client_id, secret_hash, scopes, generation, at)
        return self.account

    async def update(
        self,
        account_id: int,
        *,
        secret_hash: str,
        scopes: frozenset[str],
        generation: str,
        disabled_at: datetime | None,
        at: datetime,
    ) -> None:
        assert self.account is not None
        self.writes += 1
        self.account = ServiceAccount(
            account_id, self.account.client_id, secret_hash, scopes, generation, at, disabled_at
        )


class _AuditLog:
    def __init__(self) -> None:
        self.types: list[str] = []

    async def security_audit(self, entry: object) -> None:
        self.types.append(entry.type)  # type: ignore[attr-defined]


class _StoreUnitOfWork(_UnitOfWork):
    def __init__(self, accounts: _StoredAccounts, audit: _AuditLog) -> None:
        self.service_accounts = accounts  # type: ignore[assignment]
        self.events = audit  # type: ignore[assignment]


class _RecordedRevocations:
    def __init__(self) -> None:
        self.revoked: list[str] = []

    async def revoke_sessions(self, session_ids: Sequence[str]) -> None:
        self.revoked += session_ids

    async def revoke_token(self, jti: str, expires_at: datetime) -> None:
        raise AssertionError("accounts are revoked by generation")


GIVEN_SECRET = "k" * 43
CONTACTS = frozenset({"users:read-contacts"})


async def test_a_given_secret_is_stored_once_and_a_rerun_changes_nothing() -> None:
    accounts, audit, revocations = _StoredAccounts(), _AuditLog(), _RecordedRevocations()
    use_case = ServiceAccounts(
        unit_of_work=lambda: _StoreUnitOfWork(accounts, audit),  # type: ignore[arg-type,return-value]
        tokens=_Tokens(),
        revocations=revocations,
    )
    first = await use_case.create("notifications", CONTACTS, rotate=True, secret=GIVEN_SECRET)
    assert (first.created, first.changed, first.client_secret) == (True, True, GIVEN_SECRET)
    assert accounts.account is not None
    assert secret_matches(GIVEN_SECRET, accounts.account.secret_hash)
    generation = accounts.account.generation

    # The deployment runs it again at every release: nothing is written, nothing revoked.
    again = await use_case.create("notifications", CONTACTS, rotate=True, secret=GIVEN_SECRET)
    assert (again.created, again.changed) == (False, False)
    assert accounts.writes == 1 and revocations.revoked == []
    assert audit.types == ["SERVICE_ACCOUNT_CREATED"]

    # A new secret in the store (or other scopes) is a rotation: old tokens revoked.
    new_secret = "n" * 43
    rotated = await use_case.create("notifications", CONTACTS, rotate=True, secret=new_secret)
    assert (rotated.created, rotated.changed) == (False, True)
    assert secret_matches(new_secret, accounts.account.secret_hash)
    assert revocations.revoked == [generation]
    widened = await use_case.create(
        "notifications", CONTACTS | {"x:y"}, rotate=True, secret=new_secret
    )
    assert widened.changed and accounts.account.scopes == CONTACTS | {"x:y"}
    assert audit.types == ["SERVICE_ACCOUNT_CREATED", *2 * ["SERVICE_ACCOUNT_SECRET_ROTATED"]]


@pytest.mark.parametrize("secret", ["short", "x" * 31, "a" * 40 + " b", "é" * 40, "x" * 513])
async def test_a_given_secret_must_be_long_printable_ascii(secret: str) -> None:
    accounts = _StoredAccounts()
    use_case = ServiceAccounts(
        unit_of_work=lambda: _StoreUnitOfWork(accounts, _AuditLog()),  # type: ignore[arg-type,return-value]
        tokens=_Tokens(),
        revocations=_RecordedRevocations(),
    )
    with pytest.raises(ValueError, match="32 to 512"):
        await use_case.create("notifications", CONTACTS, secret=secret)
    assert accounts.writes == 0
