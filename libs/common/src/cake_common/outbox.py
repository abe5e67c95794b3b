"""Transactional outbox: events are rows written in the same transaction as the change.

The table layout is a cross-service CONTRACT: the events service's relay reads and marks
the ``outbox`` table of every producing service's database (through a role that can touch
nothing else), publishes rows in ``id`` order to Kafka keyed by ``aggregate_id``, and sets
``published_at``. Change it only with a migration in every service *and* the relay.

============== ============ ===================================================
column          type          meaning
============== ============ ===================================================
id              BIGSERIAL PK  publication order
event_id        UUID UNIQUE   idempotency key for consumers (``ce_id`` header)
event_type      TEXT          e.g. ``USER_FIRST_LOGIN``
aggregate_type  TEXT          e.g. ``user``
aggregate_id    TEXT          Kafka key, so one aggregate's events stay ordered
payload         BYTEA         serialized protobuf payload message
payload_type    TEXT          its full proto name
occurred_at     TIMESTAMPTZ   when the domain event happened
trace_parent    TEXT NULL     W3C traceparent of the request that caused it
created_at      TIMESTAMPTZ   row insertion time (default now())
published_at    TIMESTAMPTZ   NULL until published
attempts        INT           failed publication attempts (default 0)
next_attempt_at TIMESTAMPTZ   NULL, or earliest retry after a failure
last_error      TEXT NULL     last publication error
dead_lettered_at TIMESTAMPTZ  set when parked as a dead letter
============== ============ ===================================================

A partial index on ``id`` over unpublished rows (``published_at IS NULL``) keeps the
relay's scan proportional to the backlog, not to history.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID, uuid4

import sqlalchemy as sa
from alembic.operations import Operations
from cake.events.v1.registry import EventSpec
from google.protobuf.message import Message
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker

from cake_common.db import UnitOfWork
from cake_common.tracing import current_traceparent

OUTBOX_TABLE_NAME = "outbox"
OUTBOX_NOTIFY_CHANNEL = "cake_outbox"
OUTBOX_UNPUBLISHED_INDEX = "ix_outbox_unpublished"
OUTBOX_UNPUBLISHED_CONDITION = "published_at IS NULL"
OUTBOX_RELAY_PRIVILEGES = "SELECT, UPDATE, DELETE"

_Payload = TypeVar("_Payload", bound=Message)

# Role names are interpolated into SQL (GRANT takes no bind parameters): allow only
# plain lower-case identifiers so quoting can never be broken out of.
_ROLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def _outbox_columns() -> list[sa.Column[Any]]:
    tz = sa.DateTime(timezone=True)
    return [
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.Uuid, nullable=False),
        sa.Column("event_type", sa.Text, nullable=False),
        sa.Column("aggregate_type", sa.Text, nullable=False),
        sa.Column("aggregate_id", sa.Text, nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.Column("payload_type", sa.Text, nullable=False),
        sa.Column("occurred_at", tz, nullable=False),
        sa.Column("trace_parent", sa.Text, nullable=True),
        sa.Column("created_at", tz, nullable=False, server_default=sa.func.now()),
        sa.Column("published_at", tz, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("next_attempt_at", tz, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("dead_lettered_at", tz, nullable=True),
    ]


def outbox_table(metadata: sa.MetaData) -> sa.Table:
    """The ``outbox`` table on ``metadata`` (for queries and Alembic autogenerate)."""
    return sa.Table(
        OUTBOX_TABLE_NAME,
        metadata,
        *_outbox_columns(),
        sa.UniqueConstraint("event_id", name="uq_outbox_event_id"),
        sa.Index(
            OUTBOX_UNPUBLISHED_INDEX,
            "id",
            postgresql_where=sa.text(OUTBOX_UNPUBLISHED_CONDITION),
        ),
    )


def grant_outbox_to_relay_sql(relay_role: str) -> str:
    """SQL granting the relay role its outbox privileges, a no-op if the role does not exist
    (yet): local stacks and tests often run without it."""
    if not _ROLE_NAME.fullmatch(relay_role):
        raise ValueError(f"invalid relay role name {relay_role!r}")
    # Safe interpolation: relay_role matched _ROLE_NAME above, the rest are constants.
    return f"""
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{relay_role}') THEN
        EXECUTE format('GRANT {OUTBOX_RELAY_PRIVILEGES} ON TABLE %I TO %I',
                       '{OUTBOX_TABLE_NAME}', '{relay_role}');
    END IF;
END
$$"""  # noqa: S608


def create_outbox_table(op: Operations, relay_role: str | None) -> None:
    """Alembic ``upgrade`` step: create the table, its index, and grant the relay role."""
    op.create_table(
        OUTBOX_TABLE_NAME,
        *_outbox_columns(),
        sa.UniqueConstraint("event_id", name="uq_outbox_event_id"),
    )
    op.create_index(
        OUTBOX_UNPUBLISHED_INDEX,
        OUTBOX_TABLE_NAME,
        ["id"],
        postgresql_where=sa.text(OUTBOX_UNPUBLISHED_CONDITION),
    )
    if relay_role is not None:
        op.execute(grant_outbox_to_relay_sql(relay_role))


def drop_outbox_table(op: Operations) -> None:
    """Alembic ``downgrade`` step matching :func:`create_outbox_table`."""
    op.drop_index(OUTBOX_UNPUBLISHED_INDEX, table_name=OUTBOX_TABLE_NAME)
    op.drop_table(OUTBOX_TABLE_NAME)


class OutboxWriter:
    """Appends events to the outbox inside the caller's transaction.

    Each insert also issues ``pg_notify('cake_outbox', current_database())``: Postgres
    delivers notifications only when the transaction commits (and drops them on
    rollback), so the relay wakes exactly when a row becomes visible. The notification is
    only a hint; the relay also polls.
    """

    def __init__(self) -> None:
        self._table = outbox_table(sa.MetaData())

    async def add(
        self,
        executor: AsyncSession | AsyncConnection,
        event: EventSpec[_Payload],
        *,
        aggregate_id: str | int,
        payload: _Payload,
        occurred_at: datetime,
        trace_parent: str | None = None,
        event_id: UUID | None = None,
    ) -> UUID:
        """Insert one ``event`` (an event type of ``cake.events.v1.registry``, which names
        the row's type, aggregate type and payload type); returns its ``event_id``. The
        caller commits.

        ``trace_parent`` defaults to the current span's W3C traceparent (``None`` while
        tracing is off), so the relay and the consumers continue the request's trace.
        """
        if occurred_at.tzinfo is None:
            raise ValueError("occurred_at must be timezone-aware")
        if not isinstance(payload, event.payload):
            raise TypeError(f"{event.name} carries {event.payload_type}, not {type(payload)}")
        event_id = event_id or uuid4()
        statement = (
            sa.insert(self._table)
            .values(
                event_id=event_id,
                event_type=event.name,
                aggregate_type=event.aggregate_type,
                aggregate_id=str(aggregate_id),
                payload=payload.SerializeToString(deterministic=True),
                payload_type=event.payload_type,
                occurred_at=occurred_at,
                trace_parent=trace_parent if trace_parent is not None else current_traceparent(),
            )
            # One round trip for insert + notify.
            .returning(
                sa.func.pg_notify(OUTBOX_NOTIFY_CHANNEL, sa.func.current_database()).cast(sa.Text)
            )
        )
        await executor.execute(statement)
        return event_id

    async def add_many(
        self, executor: AsyncSession | AsyncConnection, events: Sequence[OutboxEvent]
    ) -> list[UUID]:
        """Insert many events in one statement, in the order given (their ids, hence their
        publication order, follow it), with one notification; their ``event_id``s.

        ``trace_parent`` of an event left ``None`` defaults to the current span's, as in
        :meth:`add`.
        """
        if not events:
            return []
        if any(event.occurred_at.tzinfo is None for event in events):
            raise ValueError("occurred_at must be timezone-aware")
        for event in events:
            if not isinstance(event.payload, event.event.payload):
                raise TypeError(
                    f"{event.event.name} carries {event.event.payload_type}, "
                    f"not {type(event.payload)}"
                )
        current = current_traceparent()
        event_ids = [event.event_id or uuid4() for event in events]
        await executor.execute(
            _ADD_MANY,
            {
                "event_ids": event_ids,
                "event_types": [event.event.name for event in events],
                "aggregate_types": [event.event.aggregate_type for event in events],
                "aggregate_ids": [str(event.aggregate_id) for event in events],
                "payloads": [
                    event.payload.SerializeToString(deterministic=True) for event in events
                ],
                "payload_types": [event.event.payload_type for event in events],
                "occurred_ats": [event.occurred_at for event in events],
                "trace_parents": [
                    event.trace_parent if event.trace_parent is not None else current
                    for event in events
                ],
            },
        )
        return event_ids


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """One event for :meth:`OutboxWriter.add_many` (the arguments of :meth:`OutboxWriter.add`)."""

    event: EventSpec[Any]
    """Its type in ``cake.events.v1.registry`` (row type, aggregate type, payload type)."""
    aggregate_id: str | int
    payload: Message
    occurred_at: datetime
    trace_parent: str | None = None
    event_id: UUID | None = None


_ADD_MANY = sa.text(
    f"""
WITH added AS (
    INSERT INTO {OUTBOX_TABLE_NAME} (event_id, event_type, aggregate_type, aggregate_id, payload,
                        payload_type, occurred_at, trace_parent)
    SELECT event_id, event_type, aggregate_type, aggregate_id, payload, payload_type,
           occurred_at, trace_parent
    FROM unnest(CAST(:event_ids AS uuid[]), CAST(:event_types AS text[]),
                CAST(:aggregate_types AS text[]), CAST(:aggregate_ids AS text[]),
                CAST(:payloads AS bytea[]), CAST(:payload_types AS text[]),
                CAST(:occurred_ats AS timestamptz[]), CAST(:trace_parents AS text[]))
         WITH ORDINALITY AS e(event_id, event_type, aggregate_type, aggregate_id, payload,
                              payload_type, occurred_at, trace_parent, position)
    ORDER BY position
    RETURNING 1
)
SELECT pg_notify('{OUTBOX_NOTIFY_CHANNEL}', current_database()), (SELECT count(*) FROM added)
"""  # noqa: S608 - table and channel names are constants
)


class OutboxUnitOfWork(UnitOfWork):
    """A unit of work whose repositories also record events: they pass ``outbox_writer`` to
    an event recorder in :meth:`bind_repositories`, so the events commit with the change."""

    def __init__(
        self, session_factory: async_sessionmaker[AsyncSession], outbox_writer: OutboxWriter
    ) -> None:
        super().__init__(session_factory)
        self.outbox_writer = outbox_writer
