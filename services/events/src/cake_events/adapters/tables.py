"""Tables of the events database (SQLAlchemy Core; the schema is made by migrations)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import UUID

metadata = sa.MetaData()

published_batches = sa.Table(
    "published_batches",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("published_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("event_count", sa.Integer, nullable=False),
    sa.Column("lines", sa.JSON, nullable=False),
    sa.CheckConstraint("event_count > 0", name="ck_published_batches_event_count"),
    sa.Index("ix_published_batches_published_at", "published_at"),
)
"""Audit log, as written: one row per batch Kafka acknowledged. ``lines`` holds the batch's
audit lines column by column (``{"event_id": [...], "event_type": [...], "aggregate_id":
[...], "topic": [...], "partition": [...], "kafka_offset": [...]}``, one entry per event,
in publication order)."""

published_events = sa.Table(
    "published_events",
    sa.MetaData(),  # a view (migration 0003), not a table the migrations compare
    sa.Column("event_id", UUID(as_uuid=True)),
    sa.Column("source", sa.Text),
    sa.Column("event_type", sa.Text),
    sa.Column("aggregate_id", sa.Text),
    sa.Column("topic", sa.Text),
    sa.Column("partition", sa.Integer),
    sa.Column("kafka_offset", sa.BigInteger),
    sa.Column("published_at", sa.DateTime(timezone=True)),
)
"""Audit log, as read: the view of ``published_batches`` with one line per publication
(what Kafka acknowledged, where and when). An event published twice (sent again after a
crash, or replayed) has a line for each publication."""

dead_letters = sa.Table(
    "dead_letters",
    metadata,
    sa.Column("event_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("event_type", sa.Text, nullable=False),
    sa.Column("aggregate_type", sa.Text, nullable=False),
    sa.Column("aggregate_id", sa.Text, nullable=False),
    sa.Column("topic", sa.Text, nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("last_error", sa.Text, nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),
    sa.Column("payload_type", sa.Text, nullable=False),
    sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("failed_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("retried_at", sa.DateTime(timezone=True), nullable=True),
    sa.Index(
        "ix_dead_letters_parked",
        sa.text("failed_at DESC"),
        sa.text("event_id DESC"),
        postgresql_where=sa.text("retried_at IS NULL"),
    ),
)
"""Events the relay gave up on, with everything needed to inspect or replay them.

``topic`` is NULL when the event type has no route. ``retried_at`` is set when an admin
puts the event back for publication; the row is kept as history (and reset if the event
is dead-lettered again)."""


security_audit_events = sa.Table(
    "security_audit_events",
    metadata,
    sa.Column("event_id", sa.Uuid, primary_key=True),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("type", sa.Text, nullable=False),
    sa.Column("actor_user_id", sa.BigInteger, nullable=False),
    sa.Column("subject_user_id", sa.BigInteger, nullable=False),
    sa.Column("client_ip", sa.Text, nullable=False),
    sa.Column("details", sa.JSON, nullable=False),
    sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_security_audit_time", "occurred_at", "event_id"),
    sa.Index("ix_security_audit_type_time", "type", "occurred_at"),
    sa.Index("ix_security_audit_subject", "subject_user_id", "occurred_at"),
    sa.Index("ix_security_audit_actor", "actor_user_id", "occurred_at"),
)
