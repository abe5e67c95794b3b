"""The auth service's use cases behind its RPCs: registration, login, tokens, profile."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from cake_common import audit
from cake_common.audit import AuditEntry
from cake_common.errors import NotFound, ResourceExhausted, Unauthenticated
from cake_common.jwt import Principal
from cake_common.logging import get_logger

from cake_auth.domain.login import (
    FirstLogin,
    LoginAccount,
    LoginContext,
    ThrottleKeys,
    login_account,
    throttle_keys,
)
from cake_auth.domain.sessions import (
    Session,
    SessionEnd,
    refresh_token_hash,
    session_expiry,
)
from cake_auth.domain.tokens import AccessToken
from cake_auth.domain.users import (
    User,
    field_taken,
    new_user,
    password_is_acceptable,
    profile_changes,
)
from cake_auth.metrics import AuthMetrics
from cake_auth.service.accounts import UserAccounts, utc_now
from cake_auth.service.admission import HashAdmission
from cake_auth.service.ports import (
    AuthUnitOfWork,
    LoginRecords,
    LoginThrottle,
    PasswordHasher,
    ProfileCache,
    PublishedKeys,
    Revocations,
    TokenIssuer,
    UnitOfWorkFactory,
)

INVALID_CREDENTIALS = "Invalid credentials"
SESSION_ENDED = "Session has ended, please log in again"
INVALID_REFRESH_TOKEN = "Invalid refresh token"  # noqa: S105 - a message
REFRESH_TOKEN_REUSED = "Refresh token was already used; the session has been ended"  # noqa: S105
_REFRESH_TOKEN_BYTES = 32
_IAT_RESOLUTION = timedelta(seconds=1)  # a token's iat is in whole seconds
LOGIN_THROTTLED = "Too many failed login attempts, try again later"
_TIMING_PROBE_PASSWORD = "timing-probe"  # noqa: S105  # checked against the dummy hash

_log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class RegisterUser:
    fullname: str
    email: str
    username: str
    phone: str
    password: str
    birthday: str


@dataclass(frozen=True, slots=True)
class LogIn:
    account: str
    password: str
    context: LoginContext = field(default_factory=LoginContext)


@dataclass(frozen=True, slots=True)
class UpdateProfile:
    """Fields left ``None`` stay as they are."""

    fullname: str | None = None
    email: str | None = None
    phone: str | None = None
    birthday: str | None = None


@dataclass(frozen=True, slots=True)
class AuthenticatedUser:
    user: User
    token: AccessToken
    refresh_token: str


@dataclass(frozen=True, slots=True)
class RefreshedTokens:
    token: AccessToken
    refresh_token: str


class AuthUseCases:
    def __init__(
        self,
        *,
        accounts: UserAccounts,
        unit_of_work: UnitOfWorkFactory,
        login_records: LoginRecords,
        hasher: PasswordHasher,
        admission: HashAdmission,
        tokens: TokenIssuer,
        profile_cache: ProfileCache,
        login_throttle: LoginThrottle,
        revocations: Revocations,
        published_keys: PublishedKeys,
        dummy_password_hash: str,
        metrics: AuthMetrics,
        session_lifetime_seconds: int = 7 * 24 * 3600,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._accounts = accounts
        self._unit_of_work = unit_of_work
        self._login_records = login_records
        self._hasher = hasher
        self._admission = admission
        self._tokens = tokens
        self._profile_cache = profile_cache
        self._throttle = login_throttle
        self._revocations = revocations
        self._session_lifetime = session_lifetime_seconds
        self._published_keys = published_keys
        self._dummy_password_hash = dummy_password_hash
        self._metrics = metrics
        self._clock = clock

    # -- registration ----------------------------------------------------------------------

    async def register(self, command: RegisterUser) -> AuthenticatedUser:
        # Validated first: bad input is a 400 whatever the load.
        candidate = new_user(
            fullname=command.fullname,
            email=command.email,
            username=command.username,
            phone=command.phone,
            password=command.password,
            birthday=command.birthday,
            today=self._clock().date(),
        )
        async with self._admission.admitted("register"):
            user = await self._accounts.create_user(candidate, command.password)
        async with self._unit_of_work() as uow:
            session, refresh_token = await self._open_session(uow, user, LoginContext())
            await uow.commit()
        return AuthenticatedUser(user, self._issue(user, session), refresh_token)

    # -- login -----------------------------------------------------------------------------

    async def login(self, command: LogIn) -> AuthenticatedUser:
        account = login_account(command.account)
        # Refused at once when the hash queue is full, before the throttle counts anything
        # and before the account is looked up (a refusal costs no database round trip).
        async with self._admission.admitted("login"):
            candidate = await self._find_for_login(account)
            found, keys = await self._admitted_login(account, candidate, command)
        await self._throttle.succeeded(keys)
        user, session, refresh_token = await self._record_login(found, command.context)
        self._metrics.logins.labels("success").inc()
        return AuthenticatedUser(user, self._issue(user, session), refresh_token)

    async def _admitted_login(
        self, account: LoginAccount, candidate: tuple[User, str] | None, command: LogIn
    ) -> tuple[User, ThrottleKeys]:
        """The user whose password ``command`` gives, or the login's error."""
        # Counted before the password is checked, against the account (the same counter
        # whichever identifier names it) and the client's IP.
        keys = throttle_keys(account, candidate[0].id if candidate else None, command.context)
        throttle = await self._throttle.reserve(keys)
        if throttle.retry_after_seconds is not None:
            self._metrics.logins.labels("throttled").inc()
            await self._audit(
                AuditEntry(
                    audit.LOGIN_THROTTLED,
                    self._clock(),
                    subject_user_id=candidate[0].id if candidate else 0,
                    client_ip=command.context.client_ip,
                    details={"retry_after_seconds": str(throttle.retry_after_seconds)},
                )
            )
            _log.warning(
                "login throttled",
                user_id=candidate[0].id if candidate else None,
                client_ip=command.context.client_ip,
                retry_after_seconds=throttle.retry_after_seconds,
            )
            raise ResourceExhausted(
                LOGIN_THROTTLED,
                reason="LOGIN_THROTTLED",
                metadata={"retry_after_seconds": str(throttle.retry_after_seconds)},
                retry_after_seconds=throttle.retry_after_seconds,
            )

        try:
            found = await self._check_password(candidate, command.password)
        except BaseException:
            # No verdict reached the caller (its deadline passed or it went away while the
            # hash queue was busy, or the check itself failed): not a failed password.
            await asyncio.shield(self._throttle.released(keys))
            raise
        if found is None:
            await self._throttle.failed(keys)
            self._metrics.logins.labels("invalid_credentials").inc()
            await self._audit(
                AuditEntry(
                    audit.LOGIN_FAILED,
                    self._clock(),
                    subject_user_id=candidate[0].id if candidate else 0,
                    client_ip=command.context.client_ip,
                    details={"failures": str(throttle.failures)},
                )
            )
            _log.info(
                "login failed",
                user_id=candidate[0].id if candidate else None,
                client_ip=command.context.client_ip,
                failures=throttle.failures,
            )
            raise Unauthenticated(INVALID_CREDENTIALS, reason="INVALID_CREDENTIALS")
        return found, keys

    async def _audit(self, entry: AuditEntry) -> None:
        """An audit entry on its own (when no other write happens in the call)."""
        async with self._unit_of_work() as uow:
            await uow.events.security_audit(entry)
            await uow.commit()

    async def _find_for_login(self, account: LoginAccount) -> tuple[User, str] | None:
        if not account.can_exist:
            return None
        return await self._login_records.find_for_login(account)

    async def _check_password(
        self, candidate: tuple[User, str] | None, password: str
    ) -> User | None:
        """The candidate user if ``password`` is theirs."""
        if candidate is not None and password_is_acceptable(password):
            user, password_hash = candidate
            return user if await self._hasher.verify(password, password_hash) else None
        # One full check anyway, so the response time does not tell whether the account
        # exists (or that the password could never match).
        await self._hasher.verify(_TIMING_PROBE_PASSWORD, self._dummy_password_hash)
        return None

    async def _record_login(self, found: User, context: LoginContext) -> tuple[User, Session, str]:
        if found.latest_login is not None:
            # latest_login never goes back to NULL: not a first login, no event to write.
            return await self._record_repeat_login(found, context)
        now = self._clock()
        async with self._unit_of_work() as uow:
            recorded = await uow.users.record_login(
                found.id, now, maybe_first=found.latest_login is None
            )
            if recorded is None:  # deleted since the password check
                raise Unauthenticated(INVALID_CREDENTIALS, reason="INVALID_CREDENTIALS")
            user, first = recorded
            if first:
                await uow.events.first_login(
                    FirstLogin(
                        user_id=user.id,
                        login_at=now,
                        user_agent=context.user_agent,
                        client_ip=context.client_ip,
                    )
                )
            session, refresh_token = await self._open_session(uow, user, context)
            await uow.commit()
        if first:
            self._metrics.first_logins.inc()
            _log.info("first login recorded", user_id=user.id)
        # latest_login is part of the profile: replace the cached copy.
        await self._profile_cache.put(user)
        return user, session, refresh_token

    async def _record_repeat_login(
        self, found: User, context: LoginContext
    ) -> tuple[User, Session, str]:
        session, refresh_token = self._new_session(found.id)
        user = await self._login_records.record_repeat_login(
            session,
            refresh_hash=refresh_token_hash(refresh_token),
            user_agent=context.user_agent,
            client_ip=context.client_ip,
        )
        if user is None:  # deleted since the password check
            raise Unauthenticated(INVALID_CREDENTIALS, reason="INVALID_CREDENTIALS")
        await self._profile_cache.put(user)
        return user, session, refresh_token

    # -- sessions and tokens ---------------------------------------------------------------

    def _new_session(self, user_id: int) -> tuple[Session, str]:
        now = self._clock()
        session = Session(
            id=uuid.uuid4().hex,
            user_id=user_id,
            created_at=now,
            expires_at=session_expiry(now, self._session_lifetime),
        )
        return session, secrets.token_urlsafe(_REFRESH_TOKEN_BYTES)

    async def _open_session(
        self, uow: AuthUnitOfWork, user: User, context: LoginContext
    ) -> tuple[Session, str]:
        session, refresh_token = self._new_session(user.id)
        await uow.sessions.add(
            session,
            refresh_hash=refresh_token_hash(refresh_token),
            user_agent=context.user_agent,
            client_ip=context.client_ip,
        )
        return session, refresh_token

    def _issue(self, user: User, session: Session) -> AccessToken:
        return self._tokens.issue(
            user.id, user.role, session_id=session.id, not_after=session.expires_at
        )

    async def refresh(
        self, refresh_token: str | None, principal: Principal | None
    ) -> RefreshedTokens:
        """Rotate: by refresh token if one is given, else by the caller's access token."""
        if refresh_token:
            return await self._refresh_by_token(refresh_token)
        if principal is not None:
            return await self._refresh_by_access_token(principal)
        raise Unauthenticated(
            "A refresh token or a bearer access token is required", reason="TOKEN_MISSING"
        )

    async def _refresh_by_token(self, refresh_token: str) -> RefreshedTokens:
        now = self._clock()
        token_hash = refresh_token_hash(refresh_token)
        new_refresh_token = secrets.token_urlsafe(_REFRESH_TOKEN_BYTES)
        reused: Session | None = None
        async with self._unit_of_work() as uow:
            found = await uow.sessions.find_refresh_token(token_hash)
            if found is None:
                self._metrics.refreshes.labels("invalid").inc()
                raise Unauthenticated(INVALID_REFRESH_TOKEN, reason="REFRESH_TOKEN_INVALID")
            record, session = found
            if not session.is_live(now):
                self._metrics.refreshes.labels("session_ended").inc()
                raise Unauthenticated(SESSION_ENDED, reason="SESSION_ENDED")
            if record.used:
                await uow.sessions.end(session.id, now, SessionEnd.REFRESH_REUSE)
                await uow.events.security_audit(
                    AuditEntry(
                        audit.REFRESH_TOKEN_REUSED,
                        now,
                        subject_user_id=session.user_id,
                        details={"session_id": session.id},
                    )
                )
                await uow.commit()
                reused = session
            else:
                user = await self._live_user(uow, session, now)
                await uow.sessions.retire_refresh_tokens(session.id, now)
                await uow.sessions.add_refresh_token(
                    session.id, refresh_token_hash(new_refresh_token), now
                )
                await uow.commit()
        if reused is not None:
            self._metrics.refreshes.labels("reused").inc()
            _log.warning(
                "refresh token reused; session ended",
                user_id=reused.user_id,
                session_id=reused.id,
            )
            await self._revocations.revoke_sessions([reused.id])
            raise Unauthenticated(REFRESH_TOKEN_REUSED, reason="REFRESH_TOKEN_REUSED")
        self._metrics.refreshes.labels("rotated").inc()
        return RefreshedTokens(self._issue(user, session), new_refresh_token)

    async def _refresh_by_access_token(self, principal: Principal) -> RefreshedTokens:
        """Cake's form: the bearer token (already verified and checked against the
        revocation list) is exchanged once; user and role are read again."""
        now = self._clock()
        new_refresh_token = secrets.token_urlsafe(_REFRESH_TOKEN_BYTES)
        async with self._unit_of_work() as uow:
            session = await uow.sessions.get_for_update(principal.session_id)
            if session is None or session.user_id != principal.user_id or not session.is_live(now):
                self._metrics.refreshes.labels("session_ended").inc()
                raise Unauthenticated(SESSION_ENDED, reason="SESSION_ENDED")
            user = await self._live_user(uow, session, now)
            await uow.sessions.retire_refresh_tokens(session.id, now)
            await uow.sessions.add_refresh_token(
                session.id, refresh_token_hash(new_refresh_token), now
            )
            # Before the commit: if it cannot be refused, nothing changes (503, try again).
            await self._revocations.revoke_token(principal.jti, principal.expires_at)
            await uow.commit()
        self._metrics.refreshes.labels("rotated").inc()
        return RefreshedTokens(self._issue(user, session), new_refresh_token)

    async def _live_user(self, uow: AuthUnitOfWork, session: Session, now: datetime) -> User:
        user = await uow.users.get(session.user_id)
        if user is None:
            await uow.sessions.end(session.id, now, SessionEnd.USER_GONE)
            await uow.commit()
            raise Unauthenticated(SESSION_ENDED, reason="SESSION_ENDED")
        return user

    async def logout(self, principal: Principal) -> None:
        """End the caller's session: in the database first (no refresh works any more),
        then in the shared revocation list (no service accepts its tokens)."""
        now = self._clock()
        async with self._unit_of_work() as uow:
            await uow.sessions.end(principal.session_id, now, SessionEnd.LOGOUT)
            await uow.events.security_audit(
                AuditEntry(
                    audit.LOGOUT,
                    now,
                    actor_user_id=principal.user_id,
                    subject_user_id=principal.user_id,
                    details={"session_id": principal.session_id},
                )
            )
            await uow.commit()
        await self._revocations.revoke_sessions([principal.session_id])
        _log.info("session ended", user_id=principal.user_id, reason=SessionEnd.LOGOUT)

    async def logout_all(self, principal: Principal) -> int:
        """End every session of the caller; how many were live."""
        return await self._end_user_sessions(
            principal.user_id,
            SessionEnd.LOGOUT_ALL,
            actor_user_id=principal.user_id,
            also=principal.session_id,
        )

    async def end_user_sessions(self, admin: Principal, user_id: int) -> int:
        """An admin ends every session of a user; ``NotFound`` for an unknown user."""
        async with self._unit_of_work() as uow:
            if await uow.users.get(user_id) is None:
                raise NotFound("User not found", reason="USER_NOT_FOUND")
        ended = await self._end_user_sessions(
            user_id, SessionEnd.ADMIN, actor_user_id=admin.user_id
        )
        _log.info("admin ended sessions", admin_id=admin.user_id, user_id=user_id, ended=ended)
        return ended

    async def _end_user_sessions(
        self, user_id: int, reason: SessionEnd, *, actor_user_id: int, also: str | None = None
    ) -> int:
        now = self._clock()
        async with self._unit_of_work() as uow:
            ended = await uow.sessions.end_all_of_user(user_id, now, reason)
            await uow.events.security_audit(
                AuditEntry(
                    audit.LOGOUT_ALL
                    if reason is SessionEnd.LOGOUT_ALL
                    else audit.SESSIONS_ENDED_BY_ADMIN,
                    now,
                    actor_user_id=actor_user_id,
                    subject_user_id=user_id,
                    details={"ended_sessions": str(len(ended))},
                )
            )
            await uow.commit()
        to_revoke = list(ended)
        if also is not None and also not in to_revoke:
            to_revoke.append(also)
        await self._revocations.revoke_sessions(to_revoke)
        _log.info("sessions ended", user_id=user_id, reason=reason, ended=len(ended))
        return len(ended)

    def published_keys(self) -> Sequence[dict[str, Any]]:
        return self._published_keys.public_keys()

    # -- profile ---------------------------------------------------------------------------

    async def user_contacts(self, user_id: int) -> User | None:
        """Any user's record, for callers allowed to read contacts (checked by the
        contract's access rule: admins and the ``users:read-contacts`` scope)."""
        cached = await self._profile_cache.get(user_id)
        if cached is not None:
            return cached
        async with self._unit_of_work() as uow:
            user = await uow.users.get(user_id)
        if user is not None:
            await self._profile_cache.put(user)
        return user

    async def users_contacts(self, user_ids: Sequence[int]) -> list[User]:
        """:meth:`user_contacts` for several users in one query (unknown ones left out);
        not cached: a notifier asks once per user it has not seen lately."""
        async with self._unit_of_work() as uow:
            return await uow.users.get_many(user_ids)

    async def get_profile(self, principal: Principal) -> User:
        # Whatever the token's login changed shows: iat is in whole seconds, and the login
        # wrote the profile before the token was issued.
        fresh_after = None if principal.issued_at is None else principal.issued_at + _IAT_RESOLUTION
        cached = await self._profile_cache.get(principal.user_id, fresh_after=fresh_after)
        if cached is not None:
            return cached
        async with self._unit_of_work() as uow:
            user = await uow.users.get(principal.user_id)
        if user is None:
            raise NotFound("User not found", reason="USER_NOT_FOUND")
        await self._profile_cache.put(user)
        return user

    async def update_profile(self, principal: Principal, command: UpdateProfile) -> User:
        changes = profile_changes(
            fullname=command.fullname,
            email=command.email,
            phone=command.phone,
            birthday=command.birthday,
            today=self._clock().date(),
        )
        if changes.is_empty:
            return await self.get_profile(principal)
        async with self._unit_of_work() as uow:
            taken = await uow.users.first_taken_field(
                username=None,
                email=changes.email,
                phone=changes.phone,
                exclude_id=principal.user_id,
            )
            if taken is not None:
                raise field_taken(taken)
            user = await uow.users.update_profile(principal.user_id, changes, self._clock())
            if user is None:
                raise NotFound("User not found", reason="USER_NOT_FOUND")
            await uow.commit()
        # The newer version replaces the cached copy (if Redis is failing right now, an
        # older copy may be served until its TTL ends).
        await self._profile_cache.put(user)
        return user
