"""Service accounts: creation, secret rotation and disabling (operator commands) and the
client credentials grant (``Token``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from cake_common import audit
from cake_common.audit import AuditEntry
from cake_common.db import TransactionPort
from cake_common.errors import AlreadyExists, CakeError, NotFound

from cake_auth.domain.service_accounts import (
    CLIENT_CREDENTIALS,
    MIN_CLIENT_SECRET_LENGTH,
    ClientCredentials,
    ServiceAccount,
    client_from_request,
    granted_scopes,
    hash_client_secret,
    invalid_client,
    new_client_secret,
    new_generation,
    scope_text,
    secret_matches,
    strong_client_secret,
    unsupported_grant_type,
    valid_client_id,
)
from cake_auth.domain.tokens import AccessToken
from cake_auth.metrics import AuthMetrics
from cake_auth.service.ports import Revocations


def utc_now() -> datetime:
    return datetime.now(UTC)


class ServiceAccountRepository(Protocol):
    async def add(
        self,
        *,
        client_id: str,
        secret_hash: str,
        scopes: frozenset[str],
        generation: str,
        at: datetime,
    ) -> ServiceAccount | None:
        """The new account; ``None`` if the client id is taken."""
        ...

    async def get(self, client_id: str, *, for_update: bool = False) -> ServiceAccount | None: ...

    async def update(
        self,
        account_id: int,
        *,
        secret_hash: str,
        scopes: frozenset[str],
        generation: str,
        disabled_at: datetime | None,
        at: datetime,
    ) -> None: ...


class AuditRecorder(Protocol):
    async def security_audit(self, entry: AuditEntry) -> None:
        """An entry of the security audit log, committed with the unit of work."""
        ...


class ServiceAccountUnitOfWork(TransactionPort, Protocol):
    @property
    def service_accounts(self) -> ServiceAccountRepository: ...

    @property
    def events(self) -> AuditRecorder: ...


class ServiceAccountUnitOfWorkFactory(Protocol):
    def __call__(self) -> ServiceAccountUnitOfWork: ...


class ServiceTokenIssuer(Protocol):
    def issue_service(
        self, client_id: str, scopes: Sequence[str], *, session_id: str
    ) -> AccessToken: ...


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """An access token request, transport decoded (form, fields or Basic header)."""

    grant_type: str
    client_id: str = ""
    client_secret: str = ""
    scope: str = ""
    basic: ClientCredentials | None = None


@dataclass(frozen=True, slots=True)
class IssuedServiceToken:
    token: AccessToken
    scope: str


@dataclass(frozen=True, slots=True)
class NewCredentials:
    client_id: str
    client_secret: str
    scopes: frozenset[str]
    created: bool
    """False when an existing account's secret was rotated."""
    changed: bool = True
    """False when the account already had this secret and these scopes and was enabled."""


class ServiceAccounts:
    def __init__(
        self,
        *,
        unit_of_work: ServiceAccountUnitOfWorkFactory,
        tokens: ServiceTokenIssuer,
        revocations: Revocations,
        metrics: AuthMetrics | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._unit_of_work = unit_of_work
        self._tokens = tokens
        self._revocations = revocations
        self._metrics = metrics
        self._clock = clock

    async def create(
        self,
        client_id: str,
        scopes: frozenset[str],
        *,
        rotate: bool = False,
        secret: str | None = None,
    ) -> NewCredentials:
        """A new account and its secret. For an existing name: ``AlreadyExists`` unless
        ``rotate``, which gives it a new secret and these scopes, enables it again and
        revokes every token issued before.

        ``secret``: the secret to give it instead of a generated one (a deployment's secret
        store made it). An account that already has exactly this secret and these scopes
        and is enabled is left as it is (``changed`` False, its tokens stay valid), so a
        deployment step can run this on every release."""
        if not valid_client_id(client_id):
            raise ValueError(
                "a service account name is 3 to 63 lower-case letters, digits or dashes, "
                "starting with a letter"
            )
        if secret is None:
            secret = new_client_secret()
        elif not strong_client_secret(secret):
            raise ValueError(
                f"a given client secret must be {MIN_CLIENT_SECRET_LENGTH} to 512 printable "
                "ASCII characters without spaces (e.g. 32 random bytes, base64: "
                "`openssl rand -base64 32`)"
            )
        now = self._clock()
        async with self._unit_of_work() as uow:
            existing = await uow.service_accounts.get(client_id, for_update=True)
            if (
                existing is not None
                and existing.enabled
                and existing.scopes == scopes
                and secret_matches(secret, existing.secret_hash)
            ):
                return NewCredentials(client_id, secret, scopes, created=False, changed=False)
            if existing is None:
                added = await uow.service_accounts.add(
                    client_id=client_id,
                    secret_hash=hash_client_secret(secret),
                    scopes=scopes,
                    generation=new_generation(),
                    at=now,
                )
                if added is not None:
                    await uow.events.security_audit(
                        AuditEntry(
                            audit.SERVICE_ACCOUNT_CREATED,
                            now,
                            details={"client_id": client_id, "scope": scope_text(scopes)},
                        )
                    )
                    await uow.commit()
                    return NewCredentials(client_id, secret, scopes, created=True)
            if not rotate:
                raise AlreadyExists(
                    f"Service account {client_id!r} already exists; use --rotate-secret to "
                    "give it a new secret",
                    reason="SERVICE_ACCOUNT_EXISTS",
                )
            assert existing is not None  # add() only fails on a taken name
            # Revoked before the change commits (the row is locked): if Redis cannot take the
            # mark, nothing changes and the operator runs the command again; a token issued
            # meanwhile with the old generation is refused as well.
            await self._revocations.revoke_sessions([existing.generation])
            await uow.service_accounts.update(
                existing.id,
                secret_hash=hash_client_secret(secret),
                scopes=scopes,
                generation=new_generation(),
                disabled_at=None,
                at=now,
            )
            await uow.events.security_audit(
                AuditEntry(
                    audit.SERVICE_ACCOUNT_SECRET_ROTATED,
                    now,
                    details={"client_id": client_id, "scope": scope_text(scopes)},
                )
            )
            await uow.commit()
        return NewCredentials(client_id, secret, scopes, created=False)

    async def disable(self, client_id: str) -> None:
        """No more tokens for the account, and every token it holds refused everywhere."""
        now = self._clock()
        async with self._unit_of_work() as uow:
            account = await uow.service_accounts.get(client_id, for_update=True)
            if account is None:
                raise NotFound(f"No service account {client_id!r}", reason="NOT_FOUND")
            # As for a rotation: the mark first, so a failure changes nothing.
            await self._revocations.revoke_sessions([account.generation])
            await uow.service_accounts.update(
                account.id,
                secret_hash=account.secret_hash,
                scopes=account.scopes,
                generation=new_generation(),
                disabled_at=account.disabled_at or now,
                at=now,
            )
            await uow.events.security_audit(
                AuditEntry(audit.SERVICE_ACCOUNT_DISABLED, now, details={"client_id": client_id})
            )
            await uow.commit()

    async def issue(self, grant: TokenGrant) -> IssuedServiceToken:
        """RFC 6749 section 4.4: authenticate the client, grant the scopes asked for (a
        subset of the account's), sign a short-lived token."""
        try:
            issued = await self._issue(grant)
        except CakeError as error:
            self._count(error.reason)
            raise
        self._count("issued")
        return issued

    def refused(self, error: CakeError) -> None:
        """Count a request the transport could not even decode (bad form, bad Basic header)."""
        self._count(error.reason)

    def _count(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.service_tokens.labels(result).inc()

    async def _issue(self, grant: TokenGrant) -> IssuedServiceToken:
        if grant.grant_type != CLIENT_CREDENTIALS:
            raise unsupported_grant_type(grant.grant_type)
        credentials = client_from_request(
            basic=grant.basic, client_id=grant.client_id, client_secret=grant.client_secret
        )
        account = None
        if valid_client_id(credentials.client_id):
            async with self._unit_of_work() as uow:
                account = await uow.service_accounts.get(credentials.client_id)
        # One answer for an unknown client, a wrong secret and a disabled account.
        if (
            account is None
            or not account.enabled
            or not secret_matches(credentials.client_secret, account.secret_hash)
        ):
            raise invalid_client()
        scopes = granted_scopes(grant.scope, account.scopes)
        token = self._tokens.issue_service(
            account.client_id, sorted(scopes), session_id=account.generation
        )
        return IssuedServiceToken(token=token, scope=scope_text(scopes))
