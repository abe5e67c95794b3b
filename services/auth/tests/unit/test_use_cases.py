"""Use cases against in-memory fakes of every port (the database rules have their own
integration tests; these pin down the orchestration: what is checked, hashed, recorded)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Self

import pytest
from cake_auth.domain.login import (
    FirstLogin,
    LoginAccount,
    LoginContext,
    ThrottleKeys,
    ThrottleStatus,
)
from cake_auth.domain.sessions import RefreshTokenRecord, Session
from cake_auth.domain.tokens import AccessToken
from cake_auth.domain.users import NewUser, ProfileChanges, Role, User, field_taken
from cake_auth.metrics import AuthMetrics
from cake_auth.service.accounts import CreateAdmin, UserAccounts
from cake_auth.service.admission import SERVER_BUSY_REASON, HashAdmission
from cake_auth.service.use_cases import AuthUseCases, LogIn, RegisterUser, UpdateProfile
from cake_common.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from cake_common.jwt import Principal
from prometheus_client import CollectorRegistry

NOW = datetime(2026, 11, 20, 8, 30, tzinfo=UTC)
DUMMY_HASH = "hashed:<dummy>"
PASSWORD = "secret-password"


@dataclass
class Store:
    users: dict[int, User] = field(default_factory=dict)
    hashes: dict[int, str] = field(default_factory=dict)
    events: list[FirstLogin] = field(default_factory=list)
    sessions: dict[str, Session] = field(default_factory=dict)
    refresh_tokens: dict[str, RefreshTokenRecord] = field(default_factory=dict)
    commits: int = 0


class FakeSessions:
    """Writes apply at once (the use cases' ordering, not rollback, is what is tested)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def add(
        self, new: Session, *, refresh_hash: str, user_agent: str, client_ip: str
    ) -> None:
        self._store.sessions[new.id] = new
        await self.add_refresh_token(new.id, refresh_hash, new.created_at)

    async def add_refresh_token(self, session_id: str, token_hash: str, at: datetime) -> None:
        self._store.refresh_tokens[token_hash] = RefreshTokenRecord(token_hash, session_id, at)

    async def get_for_update(self, session_id: str) -> Session | None:
        return self._store.sessions.get(session_id)

    async def find_refresh_token(
        self, token_hash: str
    ) -> tuple[RefreshTokenRecord, Session] | None:
        record = self._store.refresh_tokens.get(token_hash)
        if record is None:
            return None
        return record, self._store.sessions[record.session_id]

    async def retire_refresh_tokens(self, session_id: str, at: datetime) -> None:
        for key, record in list(self._store.refresh_tokens.items()):
            if record.session_id == session_id and record.used_at is None:
                self._store.refresh_tokens[key] = replace(record, used_at=at)

    async def end(self, session_id: str, at: datetime, reason: str) -> bool:
        session = self._store.sessions.get(session_id)
        if session is None or session.ended_at is not None:
            return False
        self._store.sessions[session_id] = replace(session, ended_at=at, end_reason=reason)
        return True

    async def end_all_of_user(self, user_id: int, at: datetime, reason: str) -> list[str]:
        live = [
            s.id
            for s in self._store.sessions.values()
            if s.user_id == user_id and s.ended_at is None
        ]
        for session_id in live:
            await self.end(session_id, at, reason)
        return live


class FakeUsers:
    def __init__(self, store: Store) -> None:
        self._store = store

    def _find(self, predicate: Any) -> User | None:
        return next((u for u in self._store.users.values() if predicate(u)), None)

    async def add(self, user: NewUser, password_hash: str) -> User:
        taken = await self.first_taken_field(
            username=user.username, email=user.email, phone=user.phone, exclude_id=None
        )
        if taken is not None:
            raise field_taken(taken)
        user_id = len(self._store.users) + 1
        created = User(
            id=user_id,
            fullname=user.fullname,
            email=user.email,
            username=user.username,
            phone=user.phone,
            birthday=user.birthday,
            role=user.role,
            latest_login=None,
            created_at=NOW,
            updated_at=NOW,
            version=1,
        )
        self._store.users[user_id] = created
        self._store.hashes[user_id] = password_hash
        return created

    async def get(self, user_id: int) -> User | None:
        return self._store.users.get(user_id)

    async def get_many(self, user_ids: Sequence[int]) -> list[User]:
        return [self._store.users[u] for u in user_ids if u in self._store.users]

    async def get_by_username(self, username: str) -> User | None:
        return self._find(lambda u: u.username.lower() == username.lower())

    async def find_for_login(self, account: LoginAccount) -> tuple[User, str] | None:
        user = (
            self._find(lambda u: u.username.lower() == account.lowered)
            or self._find(lambda u: u.email == account.lowered)
            or self._find(lambda u: u.phone == account.phone)
        )
        return None if user is None else (user, self._store.hashes[user.id])

    async def first_taken_field(
        self, *, username: str | None, email: str | None, phone: str | None, exclude_id: int | None
    ) -> str | None:
        others = [u for u in self._store.users.values() if u.id != exclude_id]
        if username is not None and any(u.username.lower() == username.lower() for u in others):
            return "username"
        if email is not None and any(u.email == email for u in others):
            return "email"
        if phone is not None and any(u.phone == phone for u in others):
            return "phone"
        return None

    def _change(self, user_id: int, **values: Any) -> User | None:
        user = self._store.users.get(user_id)
        if user is None:
            return None
        changed = replace(user, **values, version=user.version + 1)
        self._store.users[user_id] = changed
        return changed

    async def record_login(
        self, user_id: int, at: datetime, *, maybe_first: bool
    ) -> tuple[User, bool] | None:
        user = self._store.users.get(user_id)
        if user is None:
            return None
        first = maybe_first and user.latest_login is None
        changed = self._change(user_id, latest_login=at, updated_at=at)
        assert changed is not None
        return changed, first

    async def update_profile(
        self, user_id: int, changes: ProfileChanges, at: datetime
    ) -> User | None:
        values = {
            name: getattr(changes, name)
            for name in ("fullname", "email", "phone", "birthday")
            if getattr(changes, name) is not None
        }
        return self._change(user_id, **values, updated_at=at)

    async def set_role(self, user_id: int, role: Role, at: datetime) -> User | None:
        return self._change(user_id, role=role, updated_at=at)


class FakeEvents:
    audited: list[Any] = []

    def __init__(self, pending: list[FirstLogin]) -> None:
        self._pending = pending

    async def first_login(self, event: FirstLogin) -> None:
        self._pending.append(event)

    async def security_audit(self, entry: Any) -> None:
        self.audited.append(entry)


class FakeUnitOfWork:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._pending: list[FirstLogin] = []
        self.users = FakeUsers(store)
        self.sessions = FakeSessions(store)
        self.events = FakeEvents(self._pending)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._pending.clear()  # uncommitted events are lost, like a rollback

    async def commit(self) -> None:
        self._store.events.extend(self._pending)
        self._pending.clear()
        self._store.commits += 1


class FakeLoginRecords:
    """The login path's single statements on the same store (each applies at once)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._users = FakeUsers(store)
        self._sessions = FakeSessions(store)
        self.lookups = 0

    async def find_for_login(self, account: LoginAccount) -> tuple[User, str] | None:
        self.lookups += 1
        return await self._users.find_for_login(account)

    async def record_repeat_login(
        self, new: Session, *, refresh_hash: str, user_agent: str, client_ip: str
    ) -> User | None:
        recorded = await self._users.record_login(new.user_id, new.created_at, maybe_first=False)
        if recorded is None:
            return None
        await self._sessions.add(
            new, refresh_hash=refresh_hash, user_agent=user_agent, client_ip=client_ip
        )
        return recorded[0]


class FakeHasher:
    def __init__(self) -> None:
        self.hashed: list[str] = []
        self.verified: list[tuple[str, str]] = []
        self.gate: asyncio.Event | None = None
        """When set, a check waits for it (a busy hash queue)."""
        self.checking = asyncio.Event()

    async def hash(self, password: str) -> str:
        self.hashed.append(password)
        return f"hashed:{password}"

    async def verify(self, password: str, password_hash: str) -> bool:
        self.checking.set()
        if self.gate is not None:
            await self.gate.wait()
        self.verified.append((password, password_hash))
        return password_hash == f"hashed:{password}"

    async def close(self) -> None:
        pass


class FakeTokens:
    def issue(
        self,
        user_id: int,
        role: Role | str,
        *,
        session_id: str,
        not_after: datetime | None = None,
    ) -> AccessToken:
        expires_at = min(NOW + timedelta(minutes=15), not_after or NOW + timedelta(days=1))
        return AccessToken(
            f"token:{user_id}:{role}",
            f"jti-{user_id}",
            expires_at,
            session_id=session_id,
            issued_at=NOW,
        )


class FakeCache:
    def __init__(self) -> None:
        self.entries: dict[int, User] = {}
        self.fresh_after: list[datetime | None] = []

    async def get(self, user_id: int, *, fresh_after: datetime | None = None) -> User | None:
        self.fresh_after.append(fresh_after)
        return self.entries.get(user_id)

    async def put(self, user: User) -> None:
        cached = self.entries.get(user.id)
        if cached is None or cached.version < user.version:
            self.entries[user.id] = user


class FakeThrottle:
    """Counts per account key like the real one: before the password check."""

    def __init__(self, max_failures: int = 5) -> None:
        self.failures: dict[str, int] = {}
        self.ip_failures: dict[str, int] = {}
        self._max = max_failures

    async def reserve(self, keys: ThrottleKeys) -> ThrottleStatus:
        failures = self.failures.get(keys.account, 0)
        if failures >= self._max:
            return ThrottleStatus(failures, 60)
        self.failures[keys.account] = failures + 1
        return ThrottleStatus(failures + 1)

    async def succeeded(self, keys: ThrottleKeys) -> None:
        self.failures.pop(keys.account, None)

    async def failed(self, keys: ThrottleKeys) -> None:
        self.ip_failures[keys.client_ip] = self.ip_failures.get(keys.client_ip, 0) + 1

    async def released(self, keys: ThrottleKeys) -> None:
        left = self.failures.get(keys.account, 0) - 1
        if left > 0:
            self.failures[keys.account] = left
        else:
            self.failures.pop(keys.account, None)


class FakeRevocations:
    def __init__(self) -> None:
        self.sessions: set[str] = set()
        self.tokens: dict[str, datetime] = {}

    async def revoke_sessions(self, session_ids: Any) -> None:
        self.sessions.update(session_ids)

    async def revoke_token(self, jti: str, expires_at: datetime) -> None:
        self.tokens[jti] = expires_at


class FakeKeys:
    def public_keys(self) -> list[dict[str, Any]]:
        return [{"kid": "k1"}]


@dataclass
class World:
    store: Store
    hasher: FakeHasher
    cache: FakeCache
    throttle: FakeThrottle
    revocations: FakeRevocations
    use_cases: AuthUseCases
    accounts: UserAccounts
    admission: HashAdmission
    login_records: FakeLoginRecords


@pytest.fixture
def world() -> World:
    store = Store()
    hasher, cache, throttle = FakeHasher(), FakeCache(), FakeThrottle()
    revocations = FakeRevocations()
    metrics = AuthMetrics(CollectorRegistry())
    admission = HashAdmission(workers=1, max_waiting=1, metrics=metrics)

    def unit_of_work() -> FakeUnitOfWork:
        return FakeUnitOfWork(store)

    accounts = UserAccounts(
        unit_of_work=unit_of_work,
        hasher=hasher,
        profile_cache=cache,
        metrics=metrics,
        clock=lambda: NOW,
    )
    login_records = FakeLoginRecords(store)
    use_cases = AuthUseCases(
        accounts=accounts,
        unit_of_work=unit_of_work,
        login_records=login_records,
        hasher=hasher,
        admission=admission,
        tokens=FakeTokens(),
        profile_cache=cache,
        login_throttle=throttle,
        revocations=revocations,
        published_keys=FakeKeys(),
        dummy_password_hash=DUMMY_HASH,
        metrics=metrics,
        clock=lambda: NOW,
    )
    return World(
        store, hasher, cache, throttle, revocations, use_cases, accounts, admission, login_records
    )


def registration(**overrides: str) -> RegisterUser:
    values = {
        "fullname": "Ada Lovelace",
        "email": "Ada@Example.com",
        "username": "Ada_L",
        "phone": "+84 912-345-678",
        "password": PASSWORD,
        "birthday": "1990-02-28",
    }
    values.update(overrides)
    return RegisterUser(**values)


def principal(user_id: int, jti: str = "jti-1", session_id: str = "s-1") -> Principal:
    return Principal(
        user_id=user_id,
        role="user",
        jti=jti,
        expires_at=NOW + timedelta(hours=1),
        session_id=session_id,
    )


async def test_register_normalises_hashes_and_issues_a_token(world: World) -> None:
    result = await world.use_cases.register(registration())
    assert result.user.email == "ada@example.com"
    assert result.user.phone == "+84912345678"
    assert result.token.token == "token:1:user"
    assert world.store.hashes[1] == f"hashed:{PASSWORD}"
    assert result.user.latest_login is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"username": "ADA_l", "email": "x@y.z", "phone": "+1 555 0100"},
            "Username already exists",
        ),
        (
            {"username": "other", "email": "ADA@example.COM", "phone": "+1 555 0100"},
            "Email already exists",
        ),
        (
            {"username": "other", "email": "x@y.z", "phone": "+84912-345 678"},
            "Phone number already exists",
        ),
        # Several taken: Cake's order decides which one is reported.
        ({"username": "ada_l", "email": "ada@example.com"}, "Username already exists"),
    ],
)
async def test_duplicates_are_refused_before_hashing(
    world: World, overrides: dict[str, str], message: str
) -> None:
    await world.use_cases.register(registration())
    hashes_before = len(world.hasher.hashed)
    with pytest.raises(AlreadyExists) as caught:
        await world.use_cases.register(registration(**overrides))
    assert caught.value.message == message
    assert len(world.hasher.hashed) == hashes_before


async def test_unknown_account_still_pays_one_check(world: World) -> None:
    with pytest.raises(Unauthenticated) as caught:
        await world.use_cases.login(LogIn("nobody", PASSWORD))
    assert caught.value.message == "Invalid credentials"
    assert [stored for _, stored in world.hasher.verified] == [DUMMY_HASH]


async def test_impossible_password_is_checked_against_the_dummy_only(world: World) -> None:
    await world.use_cases.register(registration())
    with pytest.raises(Unauthenticated):
        await world.use_cases.login(LogIn("Ada_L", "x" * 73))
    with pytest.raises(Unauthenticated):
        await world.use_cases.login(LogIn("Ada_L", "nul\x00"))
    assert [stored for _, stored in world.hasher.verified] == [DUMMY_HASH, DUMMY_HASH]


async def test_login_by_username_email_or_phone(world: World) -> None:
    await world.use_cases.register(registration())
    for account in ("ada_l", "ADA@EXAMPLE.COM", "+84 912 345 678"):
        result = await world.use_cases.login(LogIn(account, PASSWORD))
        assert result.user.id == 1


async def test_throttle_counts_failures_and_success_resets(world: World) -> None:
    await world.use_cases.register(registration())
    for _ in range(2):
        with pytest.raises(Unauthenticated):
            await world.use_cases.login(LogIn("Ada_L", "wrong"))
    # One counter for the account, whichever identifier names it.
    with pytest.raises(Unauthenticated):
        await world.use_cases.login(LogIn("ada@example.com", "wrong"))
    assert world.throttle.failures == {"user:1": 3}
    await world.use_cases.login(LogIn("ADA_L", PASSWORD))
    assert world.throttle.failures == {}
    # Unknown accounts are counted by name.
    with pytest.raises(Unauthenticated):
        await world.use_cases.login(LogIn("Nobody", "wrong"))
    assert world.throttle.failures == {"name:nobody": 1}


async def test_throttled_account_is_refused_without_a_password_check(world: World) -> None:
    await world.use_cases.register(registration())
    world.throttle.failures["user:1"] = 5
    checks_before = len(world.hasher.verified)
    with pytest.raises(ResourceExhausted) as caught:
        await world.use_cases.login(LogIn("Ada_L", PASSWORD))
    assert caught.value.message == "Too many failed login attempts, try again later"
    assert caught.value.metadata == {"retry_after_seconds": "60"}
    assert caught.value.retry_after_seconds == 60  # the Retry-After header
    assert len(world.hasher.verified) == checks_before


async def test_logins_abandoned_while_their_hash_waits_are_not_counted_as_failures(
    world: World,
) -> None:
    """A caller that goes away (deadline, disconnect) before its check ends got no verdict:
    under overload such abandoned logins must not lock the account out."""
    await world.use_cases.register(registration())
    world.hasher.gate = asyncio.Event()
    for _ in range(7):  # more than the throttle's 5 free failures
        world.hasher.checking.clear()
        attempt = asyncio.create_task(world.use_cases.login(LogIn("ada_l", "wrong-password")))
        await world.hasher.checking.wait()
        assert world.throttle.failures == {"user:1": 1}  # counted while it waits
        attempt.cancel()
        with pytest.raises(asyncio.CancelledError):
            await attempt
        assert world.throttle.failures == {}
    world.hasher.gate = None
    logged_in = await world.use_cases.login(LogIn("ada_l", PASSWORD))
    assert logged_in.user.username == "Ada_L"


async def test_first_login_records_one_event_with_its_context(world: World) -> None:
    await world.use_cases.register(registration())
    context = LoginContext(user_agent="CakeApp/1.0", client_ip="203.0.113.9")
    first = await world.use_cases.login(LogIn("Ada_L", PASSWORD, context))
    await world.use_cases.login(LogIn("Ada_L", PASSWORD, context))
    assert world.store.events == [
        FirstLogin(user_id=1, login_at=NOW, user_agent="CakeApp/1.0", client_ip="203.0.113.9")
    ]
    assert first.user.latest_login == NOW
    # The profile cache holds the copy with latest_login set.
    assert world.cache.entries[1].latest_login == NOW


async def test_profile_is_read_through_the_cache(world: World) -> None:
    await world.use_cases.register(registration())
    assert 1 not in world.cache.entries
    user = await world.use_cases.get_profile(principal(1))
    assert world.cache.entries[1] == user


async def test_a_profile_read_asks_for_a_copy_newer_than_the_tokens_login(world: World) -> None:
    await world.use_cases.register(registration())
    issued = replace(principal(1), issued_at=NOW.replace(microsecond=0))
    await world.use_cases.get_profile(issued)
    await world.use_cases.get_profile(principal(1))
    # iat is whole seconds and the login wrote the profile before issuing the token: a copy
    # read a second after iat holds it. A principal without iat asks for any copy.
    assert world.cache.fresh_after == [NOW.replace(microsecond=0) + timedelta(seconds=1), None]


async def test_profile_update_replaces_the_cached_copy(world: World) -> None:
    await world.use_cases.register(registration())
    await world.use_cases.get_profile(principal(1))
    updated = await world.use_cases.update_profile(
        principal(1), UpdateProfile(fullname="Ada King", birthday="1815-12-10")
    )
    assert (updated.fullname, updated.birthday.isoformat() if updated.birthday else None) == (
        "Ada King",
        "1815-12-10",
    )
    assert (await world.use_cases.get_profile(principal(1))).fullname == "Ada King"


async def test_empty_profile_update_writes_nothing(world: World) -> None:
    await world.use_cases.register(registration())
    commits = world.store.commits
    user = await world.use_cases.update_profile(principal(1), UpdateProfile())
    assert user.version == 1
    assert world.store.commits == commits


async def test_profile_update_refuses_another_users_email(world: World) -> None:
    await world.use_cases.register(registration())
    await world.use_cases.register(
        registration(username="grace", email="grace@example.com", phone="+1 555 0100")
    )
    with pytest.raises(AlreadyExists) as caught:
        await world.use_cases.update_profile(principal(2), UpdateProfile(email="ADA@example.com"))
    assert caught.value.message == "Email already exists"
    # Keeping one's own e-mail is not a conflict.
    await world.use_cases.update_profile(principal(1), UpdateProfile(email="ada@example.com"))


async def _logged_in(world: World) -> tuple[Principal, str]:
    await world.use_cases.register(registration())
    result = await world.use_cases.login(LogIn("ada_l", PASSWORD))
    caller = Principal(
        user_id=result.user.id,
        role=str(result.user.role),
        jti=result.token.jti,
        expires_at=result.token.expires_at,
        session_id=result.token.session_id,
    )
    return caller, result.refresh_token


async def test_login_opens_a_session_with_a_short_token(world: World) -> None:
    caller, refresh_token = await _logged_in(world)
    session = world.store.sessions[caller.session_id]
    assert session.user_id == caller.user_id
    assert session.expires_at == NOW + timedelta(days=7)
    assert refresh_token and len(refresh_token) >= 40


async def test_logout_ends_the_session_everywhere(world: World) -> None:
    caller, refresh_token = await _logged_in(world)
    await world.use_cases.logout(caller)
    assert world.store.sessions[caller.session_id].end_reason == "logout"
    assert caller.session_id in world.revocations.sessions
    with pytest.raises(Unauthenticated, match="Session has ended"):
        await world.use_cases.refresh(refresh_token, None)


async def test_refresh_rotates_and_reuse_ends_the_session(world: World) -> None:
    caller, first = await _logged_in(world)
    second = (await world.use_cases.refresh(first, None)).refresh_token
    assert second != first
    third = (await world.use_cases.refresh(second, None)).refresh_token

    # The first token again: someone else has it. The whole session ends.
    with pytest.raises(Unauthenticated) as caught:
        await world.use_cases.refresh(first, None)
    assert caught.value.reason == "REFRESH_TOKEN_REUSED"
    assert world.store.sessions[caller.session_id].end_reason == "refresh_reuse"
    assert caller.session_id in world.revocations.sessions
    with pytest.raises(Unauthenticated, match="Session has ended"):
        await world.use_cases.refresh(third, None)


async def test_unknown_refresh_token_changes_nothing(world: World) -> None:
    caller, _ = await _logged_in(world)
    with pytest.raises(Unauthenticated) as caught:
        await world.use_cases.refresh("made-up", None)
    assert caught.value.reason == "REFRESH_TOKEN_INVALID"
    assert world.store.sessions[caller.session_id].ended_at is None


async def test_cake_form_refresh_rereads_the_role_and_retires_the_old_token(
    world: World,
) -> None:
    caller, old_refresh = await _logged_in(world)
    world.store.users[caller.user_id] = replace(world.store.users[caller.user_id], role=Role.ADMIN)
    refreshed = await world.use_cases.refresh("", caller)
    assert refreshed.token.token == f"token:{caller.user_id}:admin"
    assert refreshed.token.session_id == caller.session_id
    assert world.revocations.tokens == {caller.jti: caller.expires_at}
    # The refresh token issued before is now a used one.
    with pytest.raises(Unauthenticated) as caught:
        await world.use_cases.refresh(old_refresh, None)
    assert caught.value.reason == "REFRESH_TOKEN_REUSED"


async def test_refresh_needs_a_token_of_some_kind(world: World) -> None:
    with pytest.raises(Unauthenticated) as caught:
        await world.use_cases.refresh("", None)
    assert caught.value.reason == "TOKEN_MISSING"


async def test_cake_form_refresh_of_an_unknown_session_is_refused(world: World) -> None:
    await world.use_cases.register(registration())
    with pytest.raises(Unauthenticated, match="Session has ended"):
        await world.use_cases.refresh("", principal(1, session_id="no-such-session"))


async def test_absolute_lifetime_is_not_extended_by_refreshing(world: World) -> None:
    caller, refresh_token = await _logged_in(world)
    session = world.store.sessions[caller.session_id]
    world.store.sessions[caller.session_id] = replace(session, expires_at=NOW)
    with pytest.raises(Unauthenticated, match="Session has ended"):
        await world.use_cases.refresh(refresh_token, None)


async def test_logout_all_and_admin_end_every_session(world: World) -> None:
    caller, _ = await _logged_in(world)
    other = await world.use_cases.login(LogIn("ada_l", PASSWORD))
    assert await world.use_cases.logout_all(caller) == 3  # register, login, login
    assert {caller.session_id, other.token.session_id} <= world.revocations.sessions

    again = await world.use_cases.login(LogIn("ada_l", PASSWORD))
    admin = Principal(user_id=99, role="admin", jti="a", expires_at=NOW, session_id="as")
    assert await world.use_cases.end_user_sessions(admin, caller.user_id) == 1
    assert again.token.session_id in world.revocations.sessions
    with pytest.raises(NotFound):
        await world.use_cases.end_user_sessions(admin, 12345)


async def test_create_admin_creates_or_promotes(world: World) -> None:
    created = await world.accounts.create_admin(
        CreateAdmin(
            username="root", email="root@example.com", phone="+1 555 0199", password=PASSWORD
        )
    )
    assert created.created
    assert (created.user.role, created.user.fullname, created.user.birthday) == (
        Role.ADMIN,
        "root",
        None,
    )
    await world.use_cases.register(registration())
    promoted = await world.accounts.create_admin(
        CreateAdmin(
            username="ADA_L", email="new@example.com", phone="+1 555 0142", password="other-pw"
        )
    )
    assert not promoted.created
    assert promoted.user.role is Role.ADMIN
    assert promoted.user.email == "ada@example.com"  # left unchanged
    assert world.store.hashes[promoted.user.id] == f"hashed:{PASSWORD}"


# -- admission control at the hash queue -------------------------------------------------------


async def test_a_full_hash_queue_refuses_logins_before_the_throttle_counts_them(
    world: World,
) -> None:
    await world.use_cases.register(registration())
    world.hasher.verified.clear()
    async with world.admission.admitted("login"), world.admission.admitted("login"):
        for _ in range(7):  # more than the throttle's 5 free failures
            with pytest.raises(Unavailable) as refused:
                await world.use_cases.login(LogIn("ada_l", "wrong-password"))
            assert refused.value.reason == SERVER_BUSY_REASON
            assert refused.value.retry_after_seconds is not None
            assert refused.value.retry_after_seconds >= 1
            assert refused.value.metadata == {
                "retry_after_seconds": str(refused.value.retry_after_seconds)
            }
    # Nothing was hashed or counted (the account is not throttled by the refusals), and
    # not even looked up: a refusal costs no database round trip.
    assert world.hasher.verified == []
    assert world.throttle.failures == {}
    assert world.login_records.lookups == 0
    assert world.admission.in_flight == 0
    logged_in = await world.use_cases.login(LogIn("ada_l", PASSWORD))
    assert logged_in.user.username == "Ada_L"


async def test_a_full_hash_queue_refuses_registrations_but_bad_input_is_still_a_400(
    world: World,
) -> None:
    async with world.admission.admitted("register"), world.admission.admitted("register"):
        with pytest.raises(Unavailable):
            await world.use_cases.register(registration())
        with pytest.raises(InvalidArgument):
            await world.use_cases.register(registration(birthday="1990-02-30"))
    assert world.hasher.hashed == []
    assert world.store.users == {}
    created = await world.use_cases.register(registration())
    assert created.user.username == "Ada_L"


async def test_a_failed_login_frees_its_place_in_the_queue(world: World) -> None:
    await world.use_cases.register(registration())
    for _ in range(3):
        with pytest.raises(Unauthenticated):
            await world.use_cases.login(LogIn("ada_l", "wrong-password"))
    assert world.admission.in_flight == 0
