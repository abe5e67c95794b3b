"""What the use cases need from the outside world; adapters implement these."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol

from cake_common.audit import AuditEntry
from cake_common.db import TransactionPort

from cake_auth.domain.login import FirstLogin, LoginAccount, ThrottleKeys, ThrottleStatus
from cake_auth.domain.sessions import RefreshTokenRecord, Session
from cake_auth.domain.tokens import AccessToken
from cake_auth.domain.users import NewUser, ProfileChanges, Role, User


class PasswordHasher(Protocol):
    """bcrypt (``$2b$``) hashing that never blocks the event loop."""

    @property
    def concurrency(self) -> int:
        """How many hashes it computes at once (more wait for their turn)."""
        ...

    async def hash(self, password: str) -> str: ...

    async def verify(self, password: str, password_hash: str) -> bool:
        """True iff ``password`` matches; a malformed hash is simply no match."""
        ...

    async def close(self) -> None: ...


class TokenIssuer(Protocol):
    def issue(
        self,
        user_id: int,
        role: Role | str,
        *,
        session_id: str,
        not_after: datetime | None = None,
    ) -> AccessToken:
        """A signed token of this session, expiring after the TTL but never after
        ``not_after`` (the session's absolute end)."""
        ...


class ProfileCache(Protocol):
    """Optional cache of profiles: failures degrade to misses, never to errors."""

    async def get(self, user_id: int, *, fresh_after: datetime | None = None) -> User | None:
        """The cached profile; with ``fresh_after``, one that holds every change written
        before that time (a copy kept from earlier is read again)."""
        ...

    async def put(self, user: User) -> None:
        """Cache ``user`` unless a newer version of it is already cached; after a change,
        putting the new version is what invalidates the old copy."""
        ...


class LoginThrottle(Protocol):
    """Counts login attempts per account, atomically and *before* the password is checked,
    and failures per client IP once known; with its store down, a bounded local fallback
    applies."""

    async def reserve(self, keys: ThrottleKeys) -> ThrottleStatus:
        """Count this attempt as a failure of its account, or refuse it
        (``retry_after_seconds``) while the account or the client IP must wait."""
        ...

    async def failed(self, keys: ThrottleKeys) -> None:
        """The password was wrong: the client IP's failures grow too."""
        ...

    async def succeeded(self, keys: ThrottleKeys) -> None:
        """The password was right: the account's failures are cleared."""
        ...

    async def released(self, keys: ThrottleKeys) -> None:
        """The attempt reached no verdict (the caller went away, the check failed): it is
        taken back from the account's count, as if it had not been counted."""
        ...


class Revocations(Protocol):
    """The revocation list every service checks; raises ``Unavailable`` if not stored."""

    async def revoke_sessions(self, session_ids: Sequence[str]) -> None:
        """Refuse every access token of these sessions from now on."""
        ...

    async def revoke_token(self, jti: str, expires_at: datetime) -> None:
        """Refuse one access token until it expires."""
        ...


class SessionRepository(Protocol):
    async def add(
        self, new: Session, *, refresh_hash: str, user_agent: str, client_ip: str
    ) -> None: ...

    async def add_refresh_token(self, session_id: str, token_hash: str, at: datetime) -> None: ...

    async def get_for_update(self, session_id: str) -> Session | None: ...

    async def find_refresh_token(
        self, token_hash: str
    ) -> tuple[RefreshTokenRecord, Session] | None:
        """The token and its (locked) session."""
        ...

    async def retire_refresh_tokens(self, session_id: str, at: datetime) -> None: ...

    async def end(self, session_id: str, at: datetime, reason: str) -> bool: ...

    async def end_all_of_user(self, user_id: int, at: datetime, reason: str) -> list[str]: ...


class UserRepository(Protocol):
    async def add(self, user: NewUser, password_hash: str) -> User:
        """Insert; ``AlreadyExists`` (username, e-mail or phone) if a unique index objects."""
        ...

    async def get(self, user_id: int) -> User | None: ...

    async def get_many(self, user_ids: Sequence[int]) -> list[User]:
        """The users among ``user_ids`` that exist (in no set order)."""
        ...

    async def get_by_username(self, username: str) -> User | None: ...

    async def first_taken_field(
        self, *, username: str | None, email: str | None, phone: str | None, exclude_id: int | None
    ) -> str | None:
        """Which of the given fields (checked in that order) another user already has."""
        ...

    async def record_login(
        self, user_id: int, at: datetime, *, maybe_first: bool
    ) -> tuple[User, bool] | None:
        """Set ``latest_login``; the bool is True iff it was NULL before (the first login).

        ``maybe_first=False`` (it was already set when read) skips the first-login check:
        ``latest_login`` never goes back to NULL.
        """
        ...

    async def update_profile(
        self, user_id: int, changes: ProfileChanges, at: datetime
    ) -> User | None: ...

    async def set_role(self, user_id: int, role: Role, at: datetime) -> User | None: ...


class LoginRecords(Protocol):
    """The login path's reads and writes that are one statement each, run without a
    transaction around them (one round trip each; the database makes each atomic)."""

    async def find_for_login(self, account: LoginAccount) -> tuple[User, str] | None:
        """The user an account names and its password hash."""
        ...

    async def record_repeat_login(
        self, new: Session, *, refresh_hash: str, user_agent: str, client_ip: str
    ) -> User | None:
        """For a user whose ``latest_login`` is already set: set it to the session's
        ``created_at`` and open ``new`` with its first refresh token, all or nothing;
        ``None`` (nothing written) if the user is gone."""
        ...


class EventRecorder(Protocol):
    async def first_login(self, event: FirstLogin) -> None: ...

    async def security_audit(self, entry: AuditEntry) -> None:
        """An entry of the security audit log, committed with the unit of work."""
        ...


class AuthUnitOfWork(TransactionPort, Protocol):
    """One transaction: ``users`` and ``events`` see and write the same data."""

    @property
    def users(self) -> UserRepository: ...

    @property
    def sessions(self) -> SessionRepository: ...

    @property
    def events(self) -> EventRecorder: ...


class UnitOfWorkFactory(Protocol):
    def __call__(self) -> AuthUnitOfWork: ...


class PublishedKeys(Protocol):
    def public_keys(self) -> Sequence[dict[str, Any]]:
        """The published JWKs (signing key first), for clients that verify tokens."""
        ...
