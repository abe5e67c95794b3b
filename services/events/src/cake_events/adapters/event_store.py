"""The events database: audit log of publications and dead letters (SQLAlchemy Core)."""

from __future__ import annotations

from collections.abc import Sequence
from uuid import UUID

import sqlalchemy as sa
from cake_common.db import UnitOfWork
from psycopg.types.json import Jsonb
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.dialects.postgresql import UUID as PG_UUID
from sqlalchemy.ext.asyncio import AsyncSession

from cake_events.db import dead_letters, published_events
from cake_events.domain.delivery import DeadLetter, DeadLetterCursor, PublishedBatch

# One statement per batch, whose one parameter is a JSON array of the batch's columns
# (``[[event ids], [event types], [aggregate ids], [topics], [partitions], [offsets]]``):
# ROWS FROM zips the columns back into lines. The parameter is bound as jsonb, so the
# server parses the document once, not once per column. Plain SQL because SQLAlchemy Core
# has no ROWS FROM. Why JSON: json.dumps encodes whole lists in C, while psycopg builds array
# parameters element by element in Python (six arrays cost the relay more than handing
# the batch to Kafka; measured with bench/relay_throughput.py).
_RECORD_PUBLISHED = sa.text("""
INSERT INTO published_events
    (event_id, source, event_type, aggregate_id, topic, partition, kafka_offset, published_at)
SELECT line.event_id::uuid, :source, line.event_type, line.aggregate_id, line.topic,
       line.partition::integer, line.kafka_offset::bigint, now()
FROM ROWS FROM (
    jsonb_array_elements_text(:columns -> 0),
    jsonb_array_elements_text(:columns -> 1),
    jsonb_array_elements_text(:columns -> 2),
    jsonb_array_elements_text(:columns -> 3),
    jsonb_array_elements_text(:columns -> 4),
    jsonb_array_elements_text(:columns -> 5)
) AS line (event_id, event_type, aggregate_id, topic, partition, kafka_offset)
ON CONFLICT (event_id) DO NOTHING
""")
_PARK = insert(dead_letters).values(failed_at=sa.func.now(), retried_at=None)
_PARK = _PARK.on_conflict_do_update(
    index_elements=[dead_letters.c.event_id],
    # Dead-lettered again after a retry: the latest failure is what admins need to see.
    set_={
        "topic": _PARK.excluded.topic,
        "attempts": _PARK.excluded.attempts,
        "last_error": _PARK.excluded.last_error,
        "payload": _PARK.excluded.payload,
        "payload_type": _PARK.excluded.payload_type,
        "failed_at": _PARK.excluded.failed_at,
        "retried_at": None,
    },
)
_PARKED = dead_letters.c.retried_at.is_(None)


class PublishedEventRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def record(self, batch: PublishedBatch) -> None:
        """Add to the audit log; an event published again (after a crash or a replay)
        keeps its first line."""
        if not batch:
            return
        columns = [
            batch.event_ids,
            batch.event_types,
            batch.aggregate_ids,
            batch.topics,
            batch.partitions,
            batch.offsets,
        ]
        await self._session.execute(
            _RECORD_PUBLISHED, {"source": batch.source, "columns": Jsonb(columns)}
        )

    async def count_by_source(self) -> dict[str, int]:
        statement = sa.select(published_events.c.source, sa.func.count()).group_by(
            published_events.c.source
        )
        rows = (await self._session.execute(statement)).all()
        return {source: int(count) for source, count in rows}


class DeadLetterRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def park(self, letters: Sequence[DeadLetter]) -> None:
        if not letters:
            return
        await self._session.execute(
            _PARK,
            [
                {
                    "event_id": letter.event_id,
                    "source": letter.source,
                    "event_type": letter.event_type,
                    "aggregate_type": letter.aggregate_type,
                    "aggregate_id": letter.aggregate_id,
                    "topic": letter.topic,
                    "attempts": letter.attempts,
                    "last_error": letter.last_error,
                    "payload": letter.payload,
                    "payload_type": letter.payload_type,
                    "occurred_at": letter.occurred_at,
                }
                for letter in letters
            ],
        )

    async def count_parked_by_source(self) -> dict[str, int]:
        statement = (
            sa.select(dead_letters.c.source, sa.func.count())
            .where(_PARKED)
            .group_by(dead_letters.c.source)
        )
        rows = (await self._session.execute(statement)).all()
        return {source: int(count) for source, count in rows}

    async def mark_retried(self, event_ids: Sequence[UUID]) -> None:
        if not event_ids:
            return
        await self._session.execute(
            sa.update(dead_letters)
            .where(
                dead_letters.c.event_id
                == sa.any_(sa.bindparam("event_ids", type_=ARRAY(PG_UUID(as_uuid=True)))),
                _PARKED,
            )
            .values(retried_at=sa.func.now()),
            {"event_ids": list(event_ids)},
        )

    async def page(self, limit: int, after: DeadLetterCursor | None) -> list[DeadLetter]:
        """Parked dead letters, newest first, after the cursor's position."""
        statement = sa.select(dead_letters).where(_PARKED)
        if after is not None:
            statement = statement.where(
                sa.tuple_(dead_letters.c.failed_at, dead_letters.c.event_id)
                < sa.tuple_(sa.literal(after.failed_at), sa.literal(after.event_id))
            )
        statement = statement.order_by(
            dead_letters.c.failed_at.desc(), dead_letters.c.event_id.desc()
        ).limit(limit)
        rows = (await self._session.execute(statement)).mappings()
        return [
            DeadLetter(
                event_id=row["event_id"],
                source=row["source"],
                event_type=row["event_type"],
                aggregate_type=row["aggregate_type"],
                aggregate_id=row["aggregate_id"],
                topic=row["topic"],
                attempts=row["attempts"],
                last_error=row["last_error"],
                payload=row["payload"],
                payload_type=row["payload_type"],
                occurred_at=row["occurred_at"],
                failed_at=row["failed_at"],
            )
            for row in rows
        ]


class EventsUnitOfWork(UnitOfWork):
    """One transaction on the events database with its two repositories."""

    published: PublishedEventRepository
    dead_letters: DeadLetterRepository

    def bind_repositories(self, session: AsyncSession) -> None:
        self.published = PublishedEventRepository(session)
        self.dead_letters = DeadLetterRepository(session)
