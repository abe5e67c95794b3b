"""Creating users (registration and the ``create-admin`` command share the same path)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from cake_common.errors import AlreadyExists

from cake_auth.domain.users import NewUser, Role, User, field_taken, new_user
from cake_auth.metrics import AuthMetrics
from cake_auth.service.ports import PasswordHasher, ProfileCache, UnitOfWorkFactory


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class CreateAdmin:
    username: str
    email: str
    phone: str
    password: str
    fullname: str | None = None
    """Defaults to the username."""
    birthday: str | None = None


@dataclass(frozen=True, slots=True)
class AdminOutcome:
    user: User
    created: bool
    """False when an existing user was promoted."""


class UserAccounts:
    def __init__(
        self,
        *,
        unit_of_work: UnitOfWorkFactory,
        hasher: PasswordHasher,
        profile_cache: ProfileCache,
        metrics: AuthMetrics,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._unit_of_work = unit_of_work
        self._hasher = hasher
        self._profile_cache = profile_cache
        self._metrics = metrics
        self._clock = clock

    async def create_user(self, details: NewUser, password: str) -> User:
        """Hash the password and insert the user; ``AlreadyExists`` names the taken field."""
        # Checked first so a duplicate costs a query, not a bcrypt hash, and so the
        # message follows Cake's order (username, e-mail, phone). The unique indexes still
        # decide races between concurrent registrations.
        async with self._unit_of_work() as uow:
            taken = await uow.users.first_taken_field(
                username=details.username,
                email=details.email,
                phone=details.phone,
                exclude_id=None,
            )
        if taken is not None:
            self._metrics.registrations.labels("conflict").inc()
            raise field_taken(taken)
        password_hash = await self._hasher.hash(password)
        async with self._unit_of_work() as uow:
            try:
                user = await uow.users.add(details, password_hash)
            except AlreadyExists:
                self._metrics.registrations.labels("conflict").inc()
                raise
            await uow.commit()
        self._metrics.registrations.labels("created").inc()
        return user

    async def create_admin(self, command: CreateAdmin) -> AdminOutcome:
        """Create an administrator, or promote the existing user with that username."""
        details = new_user(
            fullname=command.fullname if command.fullname is not None else command.username,
            email=command.email,
            username=command.username,
            phone=command.phone,
            password=command.password,
            birthday=command.birthday,
            today=self._clock().date(),
            role=Role.ADMIN,
        )
        promoted: User | None = None
        async with self._unit_of_work() as uow:
            existing = await uow.users.get_by_username(details.username)
            if existing is not None:
                promoted = await uow.users.set_role(existing.id, Role.ADMIN, self._clock())
                await uow.commit()
        if promoted is not None:
            await self._profile_cache.put(promoted)
            return AdminOutcome(promoted, created=False)
        return AdminOutcome(await self.create_user(details, command.password), created=True)
