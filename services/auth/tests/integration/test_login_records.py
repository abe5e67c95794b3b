"""The login path's single statements against PostgreSQL: a repeat login's record is all or
nothing, concurrent ones each open their own session, and the autocommit mode they run in
never leaks into the transactions of the units of work that share the pool."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from cake_auth.adapters.login_records import SqlLoginRecords
from cake_auth.adapters.tables import refresh_tokens, sessions, users
from cake_auth.domain.login import login_account
from cake_auth.domain.sessions import Session
from cake_common.db import create_async_engine_for
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration


@pytest.fixture
async def one_connection(auth: Any, postgres_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine whose pool holds one connection, so every checkout reuses it."""
    engine = create_async_engine_for(postgres_url, pool_size=1, max_overflow=0)
    yield engine
    await engine.dispose()


def _session(user_id: int, at: datetime) -> Session:
    return Session(
        id=uuid.uuid4().hex, user_id=user_id, created_at=at, expires_at=at + timedelta(days=7)
    )


async def _rows(engine: AsyncEngine, statement: sa.Select[Any]) -> list[Any]:
    async with engine.connect() as connection:
        return list((await connection.execute(statement)).all())


async def test_a_repeat_login_sets_latest_login_and_opens_a_session_with_its_token(
    auth: Any, database: AsyncEngine
) -> None:
    registered = (await auth.register()).user
    records = SqlLoginRecords(database)
    found = await records.find_for_login(login_account(registered.username.upper()))
    assert found is not None
    user, password_hash = found
    assert user.id == registered.id
    assert password_hash.startswith("$2")

    at = datetime.now(UTC).replace(microsecond=0)
    session = _session(user.id, at)
    recorded = await records.record_repeat_login(
        session, refresh_hash="h-" + session.id, user_agent="CakeApp/3", client_ip="192.0.2.1"
    )
    assert recorded is not None
    assert (recorded.id, recorded.latest_login, recorded.updated_at) == (user.id, at, at)
    assert recorded.version == user.version + 1
    (stored,) = await _rows(database, sa.select(sessions).where(sessions.c.id == session.id))
    assert (stored.user_id, stored.created_at, stored.expires_at) == (
        user.id,
        at,
        session.expires_at,
    )
    assert (stored.user_agent, stored.client_ip, stored.ended_at) == (
        "CakeApp/3",
        "192.0.2.1",
        None,
    )
    (token,) = await _rows(
        database, sa.select(refresh_tokens).where(refresh_tokens.c.session_id == session.id)
    )
    assert (token.token_hash, token.issued_at, token.used_at) == ("h-" + session.id, at, None)


async def test_a_repeat_login_of_a_user_gone_writes_nothing(
    auth: Any, database: AsyncEngine
) -> None:
    records = SqlLoginRecords(database)
    session = _session(2_000_000_000, datetime.now(UTC))
    recorded = await records.record_repeat_login(
        session, refresh_hash="h-" + session.id, user_agent="", client_ip=""
    )
    assert recorded is None
    assert await _rows(database, sa.select(sessions).where(sessions.c.id == session.id)) == []
    assert (
        await _rows(
            database,
            sa.select(refresh_tokens).where(refresh_tokens.c.token_hash == "h-" + session.id),
        )
        == []
    )


async def test_concurrent_repeat_logins_of_one_user_each_open_their_own_session(
    auth: Any, database: AsyncEngine, postgres_url: str
) -> None:
    user_id = (await auth.register()).user.id
    engine = create_async_engine_for(postgres_url, pool_size=10, max_overflow=0)
    try:
        records = SqlLoginRecords(engine)
        at = datetime.now(UTC)
        opened = [_session(user_id, at + timedelta(milliseconds=index)) for index in range(20)]
        results = await asyncio.gather(
            *(
                records.record_repeat_login(
                    session, refresh_hash="h-" + session.id, user_agent="", client_ip=""
                )
                for session in opened
            )
        )
    finally:
        await engine.dispose()
    assert all(result is not None and result.id == user_id for result in results)
    # Each UPDATE took the row lock in turn: twenty consecutive versions, no lost update.
    versions = sorted(result.version for result in results if result is not None)
    assert versions == list(range(versions[0], versions[0] + 20))
    stored = await _rows(
        database,
        sa.select(sessions.c.id).where(sessions.c.id.in_([session.id for session in opened])),
    )
    assert len(stored) == 20
    tokens = await _rows(
        database,
        sa.select(refresh_tokens.c.session_id).where(
            refresh_tokens.c.session_id.in_([session.id for session in opened])
        ),
    )
    assert len(tokens) == 20


async def test_the_autocommit_mode_does_not_leak_into_later_transactions(
    auth: Any, one_connection: AsyncEngine
) -> None:
    user_id = (await auth.register()).user.id
    records = SqlLoginRecords(one_connection)
    assert await records.find_for_login(login_account("nobody-at-all")) is None
    # The pool's only connection again, now in a transaction that is rolled back.
    async with one_connection.connect() as connection:
        await connection.execute(
            sa.update(users).where(users.c.id == user_id).values(fullname="Rolled Back")
        )
        await connection.rollback()
    (fullname,) = await _rows(
        one_connection, sa.select(users.c.fullname).where(users.c.id == user_id)
    )
    assert fullname[0] != "Rolled Back"
