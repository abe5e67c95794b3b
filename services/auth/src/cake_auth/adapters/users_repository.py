"""The ``users`` table through SQLAlchemy Core, inside a unit of work's session."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import psycopg.errors
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from cake_auth.adapters.tables import (
    EMAIL_UNIQUE_INDEX,
    PHONE_UNIQUE_INDEX,
    USERNAME_UNIQUE_INDEX,
    users,
)
from cake_auth.domain.users import (
    NewUser,
    ProfileChanges,
    Role,
    User,
    field_taken,
    username_key,
)

_FIELD_OF_UNIQUE_INDEX = {
    USERNAME_UNIQUE_INDEX: "username",
    EMAIL_UNIQUE_INDEX: "email",
    PHONE_UNIQUE_INDEX: "phone",
}

USER_COLUMNS = [column for column in users.c if column.name != "password_hash"]

_lower_username = sa.func.lower(users.c.username)
_lower_email = sa.func.lower(users.c.email)


# The login path's statements, built once with bound parameters: building a Core statement
# costs ≈ 0.2 ms of CPU per call (and a fresh object has to compute its compiled-cache key
# again), a prebuilt one only binds values (measured with bench/login_profile.py). The
# account read is run by login_records.py, outside a transaction.
def _find_for_login_statement() -> sa.Select[Any]:
    by_username = _lower_username == sa.bindparam("lowered", type_=sa.Text)
    by_email = _lower_email == sa.bindparam("lowered", type_=sa.Text)
    by_phone = users.c.phone == sa.bindparam("phone", type_=sa.Text)
    # An all-digit username could equal someone's phone number: the username wins,
    # as it is the more specific name (e-mails contain '@', usernames cannot).
    preference = sa.case((by_username, 0), (by_email, 1), else_=2)
    return (
        sa.select(*USER_COLUMNS, users.c.password_hash)
        .where(sa.or_(by_username, by_email, by_phone))
        .order_by(preference)
        .limit(1)
    )


def _record_login_statement(*, first: bool) -> sa.Update:
    at = sa.bindparam("at", type_=users.c.latest_login.type)
    condition = users.c.id == sa.bindparam("user_id", type_=users.c.id.type)
    if first:
        condition = sa.and_(condition, users.c.latest_login.is_(None))
    return (
        sa.update(users)
        .where(condition)
        .values(latest_login=at, updated_at=at, version=users.c.version + 1)
        .returning(*USER_COLUMNS)
    )


FIND_FOR_LOGIN = _find_for_login_statement()
_RECORD_FIRST_LOGIN = _record_login_statement(first=True)
_RECORD_LOGIN = _record_login_statement(first=False)


def user_from_row(row: Any) -> User:
    return User(
        id=row.id,
        fullname=row.fullname,
        email=row.email,
        username=row.username,
        phone=row.phone,
        birthday=row.birthday,
        role=Role(row.role),
        latest_login=row.latest_login,
        created_at=row.created_at,
        updated_at=row.updated_at,
        version=row.version,
    )


def _taken_field(error: IntegrityError) -> str | None:
    """The field a unique violation concerns, or ``None`` for any other integrity error."""
    cause = error.orig
    if not isinstance(cause, psycopg.errors.UniqueViolation):
        return None
    return _FIELD_OF_UNIQUE_INDEX.get(cause.diag.constraint_name or "")


class SqlUserRepository:
    """Users in PostgreSQL; the unique indexes, not prior reads, have the last word."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def _one_user(
        self, statement: sa.Executable, parameters: dict[str, Any] | None = None
    ) -> User | None:
        try:
            row = (await self._session.execute(statement, parameters)).one_or_none()
        except IntegrityError as error:
            field = _taken_field(error)
            if field is None:
                raise
            # Another request took the value between our check and this write.
            raise field_taken(field) from None
        return None if row is None else user_from_row(row)

    async def add(self, user: NewUser, password_hash: str) -> User:
        statement = (
            sa.insert(users)
            .values(
                fullname=user.fullname,
                email=user.email,
                username=user.username,
                phone=user.phone,
                birthday=user.birthday,
                role=user.role.value,
                password_hash=password_hash,
            )
            .returning(*USER_COLUMNS)
        )
        created = await self._one_user(statement)
        assert created is not None  # INSERT … RETURNING always yields the row
        return created

    async def get(self, user_id: int) -> User | None:
        return await self._one_user(sa.select(*USER_COLUMNS).where(users.c.id == user_id))

    async def get_many(self, user_ids: Sequence[int]) -> list[User]:
        result = await self._session.execute(
            sa.select(*USER_COLUMNS).where(users.c.id.in_(list(user_ids)))
        )
        return [user_from_row(row) for row in result]

    async def get_by_username(self, username: str) -> User | None:
        return await self._one_user(
            sa.select(*USER_COLUMNS).where(_lower_username == username_key(username))
        )

    async def first_taken_field(
        self, *, username: str | None, email: str | None, phone: str | None, exclude_id: int | None
    ) -> str | None:
        checks: list[tuple[str, sa.ColumnElement[bool]]] = []
        if username is not None:
            checks.append(("username", _lower_username == username_key(username)))
        if email is not None:
            checks.append(("email", _lower_email == email.lower()))
        if phone is not None:
            checks.append(("phone", users.c.phone == phone))
        if not checks:
            return None
        statement = sa.select(*(condition.label(field) for field, condition in checks)).where(
            sa.or_(*(condition for _, condition in checks))
        )
        if exclude_id is not None:
            statement = statement.where(users.c.id != exclude_id)
        # Each value is unique, so at most one row per checked field matches.
        rows = (await self._session.execute(statement.limit(len(checks)))).all()
        for field, _ in checks:
            if any(getattr(row, field) for row in rows):
                return field
        return None

    async def record_login(
        self, user_id: int, at: datetime, *, maybe_first: bool
    ) -> tuple[User, bool] | None:
        parameters = {"user_id": user_id, "at": at}
        if maybe_first:
            # Only the transaction that still sees NULL wins: concurrent ones wait for its
            # row lock, re-check the condition against the committed row and match nothing.
            first = await self._one_user(_RECORD_FIRST_LOGIN, parameters)
            if first is not None:
                return first, True
        later = await self._one_user(_RECORD_LOGIN, parameters)
        return None if later is None else (later, False)

    async def update_profile(
        self, user_id: int, changes: ProfileChanges, at: datetime
    ) -> User | None:
        values: dict[str, Any] = {
            field: value
            for field, value in (
                ("fullname", changes.fullname),
                ("email", changes.email),
                ("phone", changes.phone),
                ("birthday", changes.birthday),
            )
            if value is not None
        }
        values.update(updated_at=at, version=users.c.version + 1)
        return await self._one_user(
            sa.update(users).where(users.c.id == user_id).values(values).returning(*USER_COLUMNS)
        )

    async def set_role(self, user_id: int, role: Role, at: datetime) -> User | None:
        return await self._one_user(
            sa.update(users)
            .where(users.c.id == user_id)
            .values(role=role.value, updated_at=at, version=users.c.version + 1)
            .returning(*USER_COLUMNS)
        )
