"""The events database: audit log of publications and dead letters (SQLAlchemy Core)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.dialects.postgresql import UUID as PG_UUID
from sqlalchemy.ext.asyncio import AsyncSession

from cake_events.adapters.tables import dead_letters, published_batches, security_audit_events
from cake_events.domain.audit import AuditCursor, AuditFilter, StoredAuditEntry
from cake_events.domain.delivery import DeadLetter, DeadLetterCursor, PublishedBatch

_RECORD_PUBLISHED = sa.insert(published_batches).values(
    published_at=sa.func.now(),
    # Serialised with json.dumps, which encodes whole lists in C (psycopg would adapt a
    # list parameter element by element in Python); a json column stores the text as it is.
    lines=sa.cast(sa.bindparam("lines", type_=sa.Text), sa.JSON),
)
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
        """Add a batch's lines to the audit log, as one row (see ``published_batches``).
        An event published again (after a crash or a replay) gets a line each time."""
        if not batch:
            return
        lines = {
            "event_id": batch.event_ids,
            "event_type": batch.event_types,
            "aggregate_id": batch.aggregate_ids,
            "topic": batch.topics,
            "partition": batch.partitions,
            "kafka_offset": batch.offsets,
        }
        await self._session.execute(
            _RECORD_PUBLISHED,
            {"source": batch.source, "event_count": len(batch), "lines": json.dumps(lines)},
        )

    async def count_by_source(self) -> dict[str, int]:
        """Publications per source (one per line of the audit log)."""
        statement = sa.select(
            published_batches.c.source, sa.func.sum(published_batches.c.event_count)
        ).group_by(published_batches.c.source)
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


class AuditLogRepository:
    """The append-only security audit log (a trigger refuses updates and deletes)."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def append(self, entries: Sequence[StoredAuditEntry], recorded_at: datetime) -> None:
        if not entries:
            return
        # A republished (replayed) entry is the same entry: kept once.
        await self._session.execute(
            insert(security_audit_events)
            .values(
                [
                    {
                        "event_id": entry.event_id,
                        "source": entry.source,
                        "type": entry.type,
                        "actor_user_id": entry.actor_user_id,
                        "subject_user_id": entry.subject_user_id,
                        "client_ip": entry.client_ip,
                        "details": dict(entry.details),
                        "occurred_at": entry.occurred_at,
                        "recorded_at": recorded_at,
                    }
                    for entry in entries
                ]
            )
            .on_conflict_do_nothing(index_elements=["event_id"])
        )

    async def page(
        self, where: AuditFilter, limit: int, after: AuditCursor | None
    ) -> list[StoredAuditEntry]:
        table = security_audit_events
        statement = sa.select(table).order_by(table.c.occurred_at.desc(), table.c.event_id.desc())
        if where.type:
            statement = statement.where(table.c.type == where.type)
        if where.user_id:
            statement = statement.where(
                sa.or_(
                    table.c.actor_user_id == where.user_id,
                    table.c.subject_user_id == where.user_id,
                )
            )
        if where.since is not None:
            statement = statement.where(table.c.occurred_at >= where.since)
        if where.until is not None:
            statement = statement.where(table.c.occurred_at < where.until)
        if after is not None:
            statement = statement.where(
                sa.tuple_(table.c.occurred_at, table.c.event_id)
                < sa.tuple_(sa.literal(after.occurred_at), sa.literal(after.event_id))
            )
        rows = (await self._session.execute(statement.limit(limit))).mappings().all()
        return [
            StoredAuditEntry(
                event_id=row["event_id"],
                source=row["source"],
                type=row["type"],
                actor_user_id=row["actor_user_id"],
                subject_user_id=row["subject_user_id"],
                client_ip=row["client_ip"],
                details=dict(row["details"] or {}),
                occurred_at=row["occurred_at"],
            )
            for row in rows
        ]
