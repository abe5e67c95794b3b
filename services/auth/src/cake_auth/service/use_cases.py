"""The auth service's use cases behind its RPCs: registration, login, tokens, profile."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cake_common.errors import NotFound, ResourceExhausted, Unauthenticated
from cake_common.jwt import Principal
from cake_common.logging import get_logger

from cake_auth.domain.login import FirstLogin, LoginAccount, LoginContext, login_account
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
from cake_auth.service.ports import (
    LoginThrottle,
    PasswordHasher,
    ProfileCache,
    PublishedKeys,
    TokenDenylist,
    TokenIssuer,
    UnitOfWorkFactory,
)

INVALID_CREDENTIALS = "Invalid credentials"
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


class AuthUseCases:
    def __init__(
        self,
        *,
        accounts: UserAccounts,
        unit_of_work: UnitOfWorkFactory,
        hasher: PasswordHasher,
        tokens: TokenIssuer,
        profile_cache: ProfileCache,
        login_throttle: LoginThrottle,
        denylist: TokenDenylist,
        published_keys: PublishedKeys,
        dummy_password_hash: str,
        metrics: AuthMetrics,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._accounts = accounts
        self._unit_of_work = unit_of_work
        self._hasher = hasher
        self._tokens = tokens
        self._profile_cache = profile_cache
        self._throttle = login_throttle
        self._denylist = denylist
        self._published_keys = published_keys
        self._dummy_password_hash = dummy_password_hash
        self._metrics = metrics
        self._clock = clock

    # -- registration ----------------------------------------------------------------------

    async def register(self, command: RegisterUser) -> AuthenticatedUser:
        user = await self._accounts.create_user(
            new_user(
                fullname=command.fullname,
                email=command.email,
                username=command.username,
                phone=command.phone,
                password=command.password,
                birthday=command.birthday,
                today=self._clock().date(),
            ),
            command.password,
        )
        return AuthenticatedUser(user, self._tokens.issue(user.id, user.role))

    # -- login -----------------------------------------------------------------------------

    async def login(self, command: LogIn) -> AuthenticatedUser:
        account = login_account(command.account)
        throttle = await self._throttle.check(account.throttle_key)
        if throttle.retry_after_seconds is not None:
            self._metrics.logins.labels("throttled").inc()
            raise ResourceExhausted(
                LOGIN_THROTTLED,
                reason="LOGIN_THROTTLED",
                metadata={"retry_after_seconds": str(throttle.retry_after_seconds)},
            )

        found = await self._check_password(account, command.password)
        if found is None:
            await self._throttle.record_failure(account.throttle_key)
            self._metrics.logins.labels("invalid_credentials").inc()
            raise Unauthenticated(INVALID_CREDENTIALS, reason="INVALID_CREDENTIALS")

        if throttle.failures:
            await self._throttle.reset(account.throttle_key)
        user = await self._record_login(found, command.context)
        self._metrics.logins.labels("success").inc()
        return AuthenticatedUser(user, self._tokens.issue(user.id, user.role))

    async def _check_password(self, account: LoginAccount, password: str) -> User | None:
        """The user the account names if ``password`` is theirs."""
        candidate = None
        if account.can_exist:
            async with self._unit_of_work() as uow:
                candidate = await uow.users.find_for_login(account)
        if candidate is not None and password_is_acceptable(password):
            user, password_hash = candidate
            return user if await self._hasher.verify(password, password_hash) else None
        # One full check anyway, so the response time does not tell whether the account
        # exists (or that the password could never match).
        await self._hasher.verify(_TIMING_PROBE_PASSWORD, self._dummy_password_hash)
        return None

    async def _record_login(self, found: User, context: LoginContext) -> User:
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
            await uow.commit()
        if first:
            self._metrics.first_logins.inc()
            _log.info("first login recorded", user_id=user.id)
        # latest_login is part of the profile: replace the cached copy.
        await self._profile_cache.put(user)
        return user

    # -- tokens ----------------------------------------------------------------------------

    def refresh(self, principal: Principal) -> AccessToken:
        """A new token (new ``jti``) for the caller; the bearer was verified by the server."""
        return self._tokens.issue(principal.user_id, principal.role)

    async def logout(self, principal: Principal) -> None:
        await self._denylist.revoke(principal.jti, principal.expires_at)

    async def is_revoked(self, jti: str) -> bool:
        return await self._denylist.is_revoked(jti)

    def published_keys(self) -> Sequence[dict[str, Any]]:
        return self._published_keys.public_keys()

    # -- profile ---------------------------------------------------------------------------

    async def get_profile(self, principal: Principal) -> User:
        cached = await self._profile_cache.get(principal.user_id)
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
