"""A producing service's ``outbox`` table, seen through the relay role (SQLAlchemy Core).

The relay role may only SELECT, UPDATE and DELETE ``outbox`` rows; everything here stays
within that (advisory locks, LISTEN and NOTIFY need no privileges).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing, asynccontextmanager, suppress
from typing import Any, LiteralString, cast
from uuid import UUID

import psycopg
import sqlalchemy as sa
from cake_common.outbox import OUTBOX_NOTIFY_CHANNEL, outbox_table
from psycopg.rows import args_row
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql.psycopg import dialect as psycopg_dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncTransaction

from cake_events.domain.delivery import ReplayStatus
from cake_events.domain.relay import Backlog, OutboxEvent, ParkedRow, ScheduledRetry

OUTBOX = outbox_table(sa.MetaData())

RELAY_LOCK_KEY = 0x43616B6552656C79
"""``pg_try_advisory_lock`` key ("CakeRely") held by the one active relay of an outbox
database. Advisory locks are per database, so one constant serves every source."""

CLAIM_CHUNK_ROWS = 500
"""Claimed rows per chunk of the claim's result stream (libpq's chunked-rows mode)."""
_CHUNKED_ROWS = psycopg.pq.version() >= 170000
"""libpq 17 has chunked-rows mode (psycopg-binary bundles a newer one); else one fetch."""

RETENTION_DELETE_CHUNK = 5000
"""Published rows deleted per statement, so a sweep never holds many row locks at once."""

_UNPUBLISHED = sa.and_(OUTBOX.c.published_at.is_(None), OUTBOX.c.dead_lettered_at.is_(None))


def _seconds(parameter: str) -> sa.ColumnElement[Any]:
    return sa.func.make_interval(0, 0, 0, 0, 0, 0, sa.bindparam(parameter, type_=sa.Float))


_OUTBOX_EVENT_COLUMNS = (
    OUTBOX.c.id,
    sa.cast(OUTBOX.c.event_id, sa.Text).label("event_id"),
    OUTBOX.c.event_type,
    OUTBOX.c.aggregate_type,
    OUTBOX.c.aggregate_id,
    OUTBOX.c.payload,
    OUTBOX.c.payload_type,
    OUTBOX.c.occurred_at,
    OUTBOX.c.trace_parent,
    OUTBOX.c.attempts,
)
"""Exactly :class:`OutboxEvent`'s fields, in its order."""


def _claim_statement(*, guard_retries: bool) -> sa.Select[Any]:
    """Due rows in id order, locked for this transaction, except ``exclude_ids`` (the
    previous batch: published, but recorded only by the transaction claiming this one).

    With ``guard_retries``, rows of an aggregate whose earlier row waits for a retry are
    skipped (they must not overtake it). That guard scans the whole backlog (the outbox
    has no index on ``next_attempt_at``), so the relay only asks for it while some row is
    waiting for a retry; otherwise the claim reads just the first ``batch_size`` rows of
    the unpublished-rows index.
    """
    statement = (
        sa.select(*_OUTBOX_EVENT_COLUMNS)
        .where(
            _UNPUBLISHED,
            sa.or_(OUTBOX.c.next_attempt_at.is_(None), OUTBOX.c.next_attempt_at <= sa.func.now()),
            # NOT IN (subquery) is hashed once per claim; `<> ALL(:ids)` compared every
            # scanned row with every excluded id whenever Postgres used a generic plan.
            OUTBOX.c.id.not_in(
                sa.select(
                    sa.func.unnest(
                        sa.cast(sa.bindparam("exclude_ids", type_=sa.Text), ARRAY(sa.BigInteger))
                    )
                ).scalar_subquery()
            ),
        )
        .order_by(OUTBOX.c.id)
        .limit(sa.bindparam("batch_size"))
        .with_for_update(skip_locked=True, of=OUTBOX)
    )
    if not guard_retries:
        return statement
    waiting = OUTBOX.alias("waiting")
    waiting_for_retry = (
        sa.select(waiting.c.aggregate_id, sa.func.min(waiting.c.id).label("first_id"))
        .where(
            waiting.c.published_at.is_(None),
            waiting.c.dead_lettered_at.is_(None),
            waiting.c.next_attempt_at > sa.func.now(),
        )
        .group_by(waiting.c.aggregate_id)
        .cte("waiting_for_retry")
    )
    return statement.outerjoin(
        waiting_for_retry, waiting_for_retry.c.aggregate_id == OUTBOX.c.aggregate_id
    ).where(
        sa.or_(
            waiting_for_retry.c.first_id.is_(None),
            OUTBOX.c.id < waiting_for_retry.c.first_id,
        )
    )


def _driver_sql(statement: sa.Select[Any]) -> LiteralString:
    """``statement`` as SQL text for psycopg (``%(name)s`` placeholders)."""
    dialect: Any = psycopg_dialect()  # type: ignore[no-untyped-call]
    sql: Any = str(statement.compile(dialect=dialect))
    return cast(LiteralString, sql)


_CLAIM_SQL = _driver_sql(_claim_statement(guard_retries=False))
_CLAIM_BEHIND_RETRIES_SQL = _driver_sql(_claim_statement(guard_retries=True))


def _claim_query(
    batch_size: int, exclude_ids: Sequence[int], *, guard_retries: bool
) -> tuple[LiteralString, dict[str, Any]]:
    """The claim's SQL (see :func:`_claim_statement`) and its parameters."""
    statement = _CLAIM_BEHIND_RETRIES_SQL if guard_retries else _CLAIM_SQL
    return statement, {"batch_size": batch_size, "exclude_ids": _id_array(exclude_ids)}


_MARK_PUBLISHED = (
    sa.update(OUTBOX)
    .where(
        OUTBOX.c.id == sa.any_(sa.cast(sa.bindparam("ids", type_=sa.Text), ARRAY(sa.BigInteger)))
    )
    .values(published_at=sa.func.now(), next_attempt_at=None)
)
_SCHEDULE_RETRY = (
    sa.update(OUTBOX)
    .where(OUTBOX.c.id == sa.bindparam("row_id"))
    .values(
        attempts=sa.bindparam("new_attempts"),
        last_error=sa.bindparam("error"),
        next_attempt_at=sa.func.now() + _seconds("delay_seconds"),
    )
)
_PARK = (
    sa.update(OUTBOX)
    .where(OUTBOX.c.id == sa.bindparam("row_id"))
    .values(
        attempts=sa.bindparam("new_attempts"),
        last_error=sa.bindparam("error"),
        next_attempt_at=None,
        dead_lettered_at=sa.func.now(),
    )
)
_NOTIFY = sa.select(sa.func.pg_notify(OUTBOX_NOTIFY_CHANNEL, sa.func.current_database()))


def _id_array(ids: Sequence[int]) -> str:
    """Row ids as a PostgreSQL array literal (``{1,2,3}``), cast to ``bigint[]`` in SQL.

    Written by hand because the relay passes thousands of ids per batch and psycopg dumps
    list parameters element by element in Python; ``str.join`` does it in C. Safe: the
    elements are ints, whose text form has no character an array literal would treat
    specially.
    """
    return "{" + ",".join(map(str, ids)) + "}"


class LeaderConnection:
    """The database session of the active relay of one outbox.

    It holds the advisory lock, LISTENs for outbox notifications and runs every claim and
    every update: if the session dies, the lock, the open transaction and its row locks all
    go with it, so a standby can never see this replica as gone while it still writes.
    """

    def __init__(self, connection: AsyncConnection) -> None:
        self._connection = connection

    async def listen(self) -> None:
        """Prepare the session for relaying: LISTEN, and keep the claim's plan bounded."""
        async with self._connection.begin():
            # Channel names cannot be bound parameters; this one is a module constant.
            await self._connection.execute(sa.text(f"LISTEN {OUTBOX_NOTIFY_CHANNEL}"))
            # The claim must walk the unpublished-rows index in id order and stop after one
            # batch. When a burst lands in a table analysed while nearly empty, the planner
            # expects a handful of rows and prefers a bitmap scan that reads and sorts the
            # WHOLE backlog on every claim (measured: 25-40 ms per 1,000-row claim at a
            # 50k backlog instead of 1 ms). Sorting is what that plan needs and what the
            # relay's statements never need, so this session makes sorts a last resort.
            await self._connection.execute(sa.text("SET enable_sort = off"))

    async def wait_for_notification(self, timeout_seconds: float) -> bool:
        """Wait until an outbox notification arrives (True) or the timeout passes (False).

        Notifications that arrived while a batch ran are buffered by psycopg and end the
        wait at once; all of them are consumed, since one claim serves them all.

        The wait itself watches the session's socket from the event loop, and only then lets
        psycopg read what arrived: psycopg's own ``notifies(timeout=...)`` wakes up every
        0.1 s to check for interrupts (py-spy on an idle stack: most of the events
        service's idle CPU, ten wake-ups a second per source).
        """
        driver = await self._driver_connection()
        if await _take_notifications(driver):
            return True
        loop = asyncio.get_running_loop()
        readable: asyncio.Future[None] = loop.create_future()

        def ready() -> None:
            if not readable.done():
                readable.set_result(None)

        socket = driver.fileno()
        loop.add_reader(socket, ready)
        try:
            with suppress(TimeoutError):
                await asyncio.wait_for(readable, timeout_seconds)
        finally:
            loop.remove_reader(socket)
        # Readable: a notification, or anything else the server sent (then this is a
        # spurious wake-up: the relay claims nothing and waits again), or a closed
        # connection (psycopg raises, as it did while waiting itself).
        return await _take_notifications(driver)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """Commit if the block succeeds, roll back if it raises."""
        transaction: AsyncTransaction = await self._connection.begin()
        try:
            yield
        except BaseException:
            # A broken session cannot roll back; closing it discards the transaction anyway.
            with suppress(Exception):
                await transaction.rollback()
            raise
        await transaction.commit()

    async def claim(
        self, batch_size: int, *, exclude_ids: Sequence[int], guard_retries: bool
    ) -> list[OutboxEvent]:
        """Inside :meth:`transaction`: lock and return the next due rows (see
        :func:`_claim_statement`)."""
        # Run on the driver's cursor, inside the transaction SQLAlchemy began: rows come back
        # in binary (no hex decoding of payloads, no parsing of timestamps) and straight
        # into OutboxEvent, which halves the relay's cost per claimed row compared with
        # SQLAlchemy's result rows; and they stream in chunks, so this process decodes the
        # first rows while PostgreSQL still locks and sends the rest (measured with
        # bench/relay_throughput.py).
        statement, params = _claim_query(batch_size, exclude_ids, guard_retries=guard_retries)
        driver = await self._driver_connection()
        # Positional: the claim selects exactly OutboxEvent's fields, in its field order.
        async with driver.cursor(binary=True, row_factory=args_row(OutboxEvent)) as cursor:
            if not _CHUNKED_ROWS:
                await cursor.execute(statement, params)
                return await cursor.fetchall()
            return [
                event async for event in cursor.stream(statement, params, size=CLAIM_CHUNK_ROWS)
            ]

    async def claim_plan(
        self, batch_size: int, *, exclude_ids: Sequence[int], guard_retries: bool
    ) -> dict[str, Any]:
        """The plan this session would run :meth:`claim` with (``EXPLAIN (FORMAT JSON)``'s
        top plan node), without claiming anything."""
        statement, params = _claim_query(batch_size, exclude_ids, guard_retries=guard_retries)
        driver = await self._driver_connection()
        async with self._connection.begin(), driver.cursor() as cursor:
            await cursor.execute("EXPLAIN (FORMAT JSON) " + statement, params)
            row = await cursor.fetchone()
        if row is None:  # pragma: no cover - EXPLAIN always answers one row
            raise RuntimeError("EXPLAIN returned no plan")
        plan: dict[str, Any] = row[0][0]["Plan"]
        return plan

    async def _driver_connection(self) -> psycopg.AsyncConnection[Any]:
        raw = await self._connection.get_raw_connection()
        return cast(psycopg.AsyncConnection[Any], raw.driver_connection)

    async def record_outcome(
        self,
        *,
        published_ids: Sequence[int],
        retries: Sequence[ScheduledRetry],
        parked: Sequence[ParkedRow],
    ) -> None:
        """Inside :meth:`transaction`: mark rows published, scheduled for a retry, or
        dead-lettered."""
        if published_ids:
            await self._connection.execute(_MARK_PUBLISHED, {"ids": _id_array(published_ids)})
        if retries:
            await self._connection.execute(
                _SCHEDULE_RETRY,
                [
                    {
                        "row_id": retry.row_id,
                        "new_attempts": retry.attempts,
                        "error": retry.error,
                        "delay_seconds": retry.delay_seconds,
                    }
                    for retry in retries
                ],
            )
        if parked:
            await self._connection.execute(
                _PARK,
                [
                    {"row_id": row.row_id, "new_attempts": row.attempts, "error": row.error}
                    for row in parked
                ],
            )

    async def backlog(self) -> Backlog:
        statement = sa.select(
            sa.func.count(),
            sa.func.coalesce(
                sa.func.extract("epoch", sa.func.now() - sa.func.min(OUTBOX.c.created_at)), 0
            ),
            sa.func.count().filter(OUTBOX.c.next_attempt_at.is_not(None)),
        ).where(_UNPUBLISHED)
        async with self._connection.begin():
            waiting, oldest, in_retry = (await self._connection.execute(statement)).one()
        return Backlog(
            waiting=int(waiting), oldest_age_seconds=float(oldest), in_retry=int(in_retry)
        )

    async def delete_published_older_than(self, retention_seconds: float) -> int:
        """Delete published rows past retention, in chunks (each its own transaction)."""
        expired = (
            sa.select(OUTBOX.c.id)
            .where(OUTBOX.c.published_at < sa.func.now() - _seconds("retention_seconds"))
            .limit(RETENTION_DELETE_CHUNK)
        )
        statement = sa.delete(OUTBOX).where(OUTBOX.c.id.in_(expired.scalar_subquery()))
        deleted = 0
        while True:
            async with self._connection.begin():
                result = await self._connection.execute(
                    statement, {"retention_seconds": retention_seconds}
                )
            deleted += result.rowcount
            if result.rowcount < RETENTION_DELETE_CHUNK:
                return deleted

    async def close(self) -> None:
        """End the session (releasing the lock), even if it is already broken."""
        try:
            await self._connection.invalidate()
        finally:
            await self._connection.close()


async def acquire_leadership(
    engine: AsyncEngine, *, retry_seconds: float, stop: asyncio.Event
) -> LeaderConnection | None:
    """Become the active relay of the outbox behind ``engine``: try the advisory lock now
    and every ``retry_seconds`` (standby) until it is ours or ``stop`` is set (None)."""
    connection = await engine.connect()
    try:
        while not stop.is_set():
            async with connection.begin():
                locked = (
                    await connection.execute(
                        sa.select(sa.func.pg_try_advisory_lock(RELAY_LOCK_KEY))
                    )
                ).scalar_one()
            if locked:
                return LeaderConnection(connection)
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), retry_seconds)
    except BaseException:
        await LeaderConnection(connection).close()
        raise
    await LeaderConnection(connection).close()
    return None


class OutboxAdministration:
    """Admin operations on one outbox, on a small pooled engine (never the leader's session)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def waiting(self) -> int:
        """Rows not yet published nor dead-lettered (in flight ones included)."""
        statement = sa.select(sa.func.count()).select_from(OUTBOX).where(_UNPUBLISHED)
        async with self._engine.connect() as connection:
            return int((await connection.execute(statement)).scalar_one())

    async def requeue_dead_letters(self) -> list[UUID]:
        """Put every dead-lettered row back for publication; returns their event ids."""
        statement = (
            sa.update(OUTBOX)
            .where(OUTBOX.c.dead_lettered_at.is_not(None), OUTBOX.c.published_at.is_(None))
            .values(attempts=0, next_attempt_at=None, dead_lettered_at=None)
            .returning(OUTBOX.c.event_id)
        )
        async with self._engine.begin() as connection:
            event_ids = list((await connection.execute(statement)).scalars())
            if event_ids:
                await connection.execute(_NOTIFY)
        return event_ids

    async def replay(self, event_id: UUID) -> ReplayStatus | None:
        """Put one published or dead-lettered event back for publication.

        None if this outbox has no such row (never written here, or deleted after its
        retention); PENDING if it is back (or was still waiting anyway).
        """
        requeue = (
            sa.update(OUTBOX)
            .where(
                OUTBOX.c.event_id == event_id,
                sa.or_(OUTBOX.c.published_at.is_not(None), OUTBOX.c.dead_lettered_at.is_not(None)),
            )
            .values(published_at=None, dead_lettered_at=None, attempts=0, next_attempt_at=None)
            .returning(OUTBOX.c.id)
        )
        exists = sa.select(OUTBOX.c.id).where(OUTBOX.c.event_id == event_id)
        async with self._engine.begin() as connection:
            if (await connection.execute(requeue)).first() is not None:
                await connection.execute(_NOTIFY)
                return ReplayStatus.PENDING
            if (await connection.execute(exists)).first() is not None:
                return ReplayStatus.PENDING
        return None


async def _take_notifications(driver: psycopg.AsyncConnection[Any]) -> bool:
    """Consume the notifications psycopg has buffered or can read without waiting."""
    received = False
    async with aclosing(driver.notifies(timeout=0)) as notes:
        async for _ in notes:
            received = True
    return received
