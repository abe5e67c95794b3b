"""Consumer-side deduplication: remember which events a consumer has already applied.

Record the event id in the same transaction as the event's effect; a redelivered event
then finds its id present and the consumer skips it, giving an exactly-once *effect* on
top of Kafka's at-least-once delivery.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from uuid import UUID

import sqlalchemy as sa
from alembic.operations import Operations
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

INBOX_TABLE_NAME = "inbox"


def _inbox_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("event_id", sa.Uuid, primary_key=True),
        sa.Column("consumer", sa.Text, primary_key=True),
        sa.Column(
            "processed_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
    ]


def inbox_table(metadata: sa.MetaData) -> sa.Table:
    """``inbox(event_id, consumer, processed_at)``, primary key ``(event_id, consumer)``."""
    return sa.Table(INBOX_TABLE_NAME, metadata, *_inbox_columns())


def create_inbox_table(op: Operations) -> None:
    """Alembic ``upgrade`` step creating the inbox table."""
    op.create_table(INBOX_TABLE_NAME, *_inbox_columns())


def drop_inbox_table(op: Operations) -> None:
    """Alembic ``downgrade`` step matching :func:`create_inbox_table`."""
    op.drop_table(INBOX_TABLE_NAME)


@functools.cache
def _table() -> sa.Table:
    return inbox_table(sa.MetaData())


async def record_once(
    executor: AsyncSession | AsyncConnection, event_id: UUID, consumer: str
) -> bool:
    """Mark ``event_id`` as processed by ``consumer``; True only the first time.

    A concurrent transaction inserting the same pair blocks on the primary key until the
    first commits (then this returns False) or rolls back (then this returns True), so
    two consumers can never both see True for one event.
    """
    table = _table()
    statement = (
        pg_insert(table)
        .values(event_id=event_id, consumer=consumer)
        .on_conflict_do_nothing(index_elements=[table.c.event_id, table.c.consumer])
        .returning(table.c.event_id)
    )
    result = await executor.execute(statement)
    return result.first() is not None


_RECORD_MANY = sa.text(
    f"""
INSERT INTO {INBOX_TABLE_NAME} (event_id, consumer)
SELECT event_id, :consumer FROM unnest(CAST(:event_ids AS uuid[])) AS e(event_id)
ORDER BY event_id
ON CONFLICT (event_id, consumer) DO NOTHING
RETURNING event_id
"""  # noqa: S608 - the table name is a constant
)


async def record_many(
    executor: AsyncSession | AsyncConnection, event_ids: Iterable[UUID], consumer: str
) -> set[UUID]:
    """:func:`record_once` for many events in one statement: the ids recorded now (the
    others were applied before, or repeat an id given earlier in ``event_ids``).

    The ids are inserted in sorted order, so two transactions recording overlapping sets
    wait for each other in one order and never deadlock.
    """
    unique = sorted(set(event_ids))
    if not unique:
        return set()
    result = await executor.execute(_RECORD_MANY, {"event_ids": unique, "consumer": consumer})
    return {UUID(str(row[0])) for row in result}
