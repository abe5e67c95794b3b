"""UnitOfWork and engine helpers against a real PostgreSQL (``postgres_url`` fixture)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa
from cake_common.db import (
    SessionTimeouts,
    UnitOfWork,
    create_async_engine_for,
    create_session_factory,
    database_probe,
    wait_for_database,
)
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

pytestmark = pytest.mark.integration

metadata = sa.MetaData()
notes = sa.Table(
    "uow_notes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("text", sa.Text, nullable=False),
)


class NotesUnitOfWork(UnitOfWork):
    async def add(self, text: str) -> None:
        await self.session.execute(sa.insert(notes).values(text=text))

    def bind_repositories(self, session: AsyncSession) -> None:
        self.bound_session = session


@pytest.fixture(scope="module")
async def engine(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine_for(postgres_url, pool_size=2, application_name="cake-common-test")
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    yield engine
    await engine.dispose()


async def _texts(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as connection:
        return list(
            (await connection.execute(sa.select(notes.c.text).order_by(notes.c.id))).scalars()
        )


async def test_commit_persists(engine: AsyncEngine) -> None:
    uow = NotesUnitOfWork(create_session_factory(engine))
    async with uow:
        assert uow.bound_session is uow.session
        await uow.add("committed")
        await uow.commit()
    assert "committed" in await _texts(engine)


async def test_exit_without_commit_rolls_back(engine: AsyncEngine) -> None:
    uow = NotesUnitOfWork(create_session_factory(engine))
    async with uow:
        await uow.add("forgotten")
    assert "forgotten" not in await _texts(engine)


async def test_exception_rolls_back(engine: AsyncEngine) -> None:
    uow = NotesUnitOfWork(create_session_factory(engine))
    with pytest.raises(RuntimeError):
        async with uow:
            await uow.add("failed")
            raise RuntimeError("use case failed")
    assert "failed" not in await _texts(engine)


async def test_reusable_but_not_reentrant(engine: AsyncEngine) -> None:
    uow = NotesUnitOfWork(create_session_factory(engine))
    async with uow:
        with pytest.raises(RuntimeError, match="already in use"):
            await uow.__aenter__()
    async with uow:
        await uow.add("second use")
        await uow.commit()
    with pytest.raises(RuntimeError, match="outside"):
        _ = uow.session
    assert "second use" in await _texts(engine)


async def test_explicit_rollback_then_commit(engine: AsyncEngine) -> None:
    uow = NotesUnitOfWork(create_session_factory(engine))
    async with uow:
        await uow.add("rolled back")
        await uow.rollback()
        await uow.add("kept")
        await uow.commit()
    texts = await _texts(engine)
    assert "kept" in texts and "rolled back" not in texts


async def test_wait_and_probe_succeed(engine: AsyncEngine) -> None:
    await wait_for_database(engine, timeout_seconds=5)
    await database_probe(engine)()


async def test_wait_gives_up_on_dead_server() -> None:
    dead = create_async_engine_for(
        "postgresql+psycopg://nobody:pw@127.0.0.1:1/none", connect_timeout_seconds=1
    )
    started = time.monotonic()
    with pytest.raises(sa.exc.OperationalError):
        await wait_for_database(dead, timeout_seconds=1)
    assert time.monotonic() - started < 10
    with pytest.raises(sa.exc.OperationalError):
        await database_probe(dead)()
    await dead.dispose()


async def test_original_error_survives_a_broken_connection(
    engine: AsyncEngine, postgres_url: str
) -> None:
    import psycopg
    from cake_common.db import libpq_url

    uow = NotesUnitOfWork(create_session_factory(engine))
    with pytest.raises(RuntimeError, match="use case failed"):
        async with uow:
            pid = await uow.session.scalar(sa.text("SELECT pg_backend_pid()"))
            with psycopg.connect(libpq_url(postgres_url), autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            raise RuntimeError("use case failed")
    # The pool recovers: the dead connection was discarded.
    assert isinstance(await _texts(engine), list)


async def test_session_timeouts_cancel_long_statements_and_abandoned_transactions(
    postgres_url: str,
) -> None:
    engine = create_async_engine_for(
        postgres_url,
        pool_size=1,
        session_timeouts=SessionTimeouts(statement_ms=200, lock_ms=200, idle_in_transaction_ms=300),
    )
    try:
        async with engine.connect() as connection:
            settings = (
                await connection.execute(
                    sa.text(
                        "SELECT current_setting('statement_timeout'),"
                        " current_setting('lock_timeout'),"
                        " current_setting('idle_in_transaction_session_timeout')"
                    )
                )
            ).one()
            assert tuple(settings) == ("200ms", "200ms", "300ms")
        began = time.monotonic()
        with pytest.raises(sa.exc.OperationalError, match="statement timeout"):
            async with engine.connect() as connection:
                await connection.execute(sa.text("SELECT pg_sleep(5)"))
        assert time.monotonic() - began < 2
        with pytest.raises(sa.exc.DBAPIError, match="idle-in-transaction timeout"):
            async with engine.connect() as connection, connection.begin():
                await connection.execute(sa.text("SELECT 1"))
                await asyncio.sleep(0.8)  # the server ends the idle transaction meanwhile
                await connection.execute(sa.text("SELECT 1"))
    finally:
        await engine.dispose()


async def test_an_exhausted_pool_fails_fast(postgres_url: str) -> None:
    engine = create_async_engine_for(
        postgres_url, pool_size=1, max_overflow=0, pool_timeout_seconds=0.3
    )
    try:
        async with engine.connect():
            began = time.monotonic()
            with pytest.raises(sa.exc.TimeoutError):
                async with engine.connect():
                    pass
            assert time.monotonic() - began < 1.5
    finally:
        await engine.dispose()


async def _checked_out_pid_and_last_query(engine: AsyncEngine, admin_url: str) -> tuple[int, str]:
    """Check a connection out without running anything on it, and read from another
    session the last statement its backend ran."""
    import psycopg

    async with engine.connect() as connection:
        raw = await connection.get_raw_connection()
        pid: int = raw.driver_connection.info.backend_pid  # type: ignore[union-attr]
        with psycopg.connect(admin_url, autocommit=True) as admin:
            row = admin.execute("SELECT query FROM pg_stat_activity WHERE pid = %s", (pid,))
            (query,) = row.fetchone() or ("",)
    return pid, query


async def test_a_checkout_costs_no_round_trip(postgres_url: str) -> None:
    # pool_pre_ping would run a SELECT 1 on every checkout: the backend's last statement
    # would be the ping, not the ROLLBACK that ended the previous use of the connection.
    from cake_common.db import libpq_url

    engine = create_async_engine_for(postgres_url, pool_size=1, max_overflow=0)
    try:
        async with engine.connect() as connection:
            await connection.execute(sa.text("SELECT 'marker of the previous use'"))
        pid, query = await _checked_out_pid_and_last_query(engine, libpq_url(postgres_url))
        assert query == "ROLLBACK", query
        # The same connection came back (nothing was dropped or reopened).
        pid_again, _ = await _checked_out_pid_and_last_query(engine, libpq_url(postgres_url))
        assert pid_again == pid
    finally:
        await engine.dispose()


async def test_connections_ended_by_the_server_while_idle_are_replaced_at_checkout(
    postgres_url: str,
) -> None:
    # A real fault: the server ends every idle connection of the pool (as a restart does);
    # the next requests, all at once, get fresh connections and no error.
    import psycopg
    from cake_common.db import libpq_url

    name = f"cake-idle-death-{time.monotonic_ns()}"
    engine = create_async_engine_for(
        postgres_url, pool_size=4, max_overflow=0, application_name=name
    )

    async def backend_pid() -> int:
        async with engine.connect() as connection:
            pid = await connection.scalar(sa.text("SELECT pg_backend_pid()"))
            await asyncio.sleep(0.05)  # hold it: the four calls use four connections
            return int(pid)

    try:
        before = set(await asyncio.gather(*(backend_pid() for _ in range(4))))
        assert len(before) == 4
        with psycopg.connect(libpq_url(postgres_url), autocommit=True) as admin:
            ended = admin.execute(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = %s) AS t",
                (name,),
            ).fetchone()
        assert ended == (4,)
        await asyncio.sleep(0.2)  # the FATAL and the close reach the client's sockets
        after = set(await asyncio.gather(*(backend_pid() for _ in range(8))))
        assert after.isdisjoint(before)
    finally:
        await engine.dispose()
