"""Tables of the notifications database (SQLAlchemy Core; migrations/ makes them)."""

from __future__ import annotations

import sqlalchemy as sa
from cake_common.inbox import inbox_table
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

metadata = sa.MetaData()

_timestamp = sa.DateTime(timezone=True)

inbox = inbox_table(metadata)

notifications = sa.Table(
    "notifications",
    metadata,
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column("user_id", sa.BigInteger, nullable=False),
    # One notification per event: the inbox makes a repeat a no-op, this makes it impossible.
    sa.Column("event_id", sa.Uuid, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("title", sa.Text, nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("facts", JSONB, nullable=False),
    sa.Column("channels", ARRAY(sa.Text), nullable=False),
    sa.Column("trace_parent", sa.Text, nullable=True),
    sa.Column("created_at", _timestamp, nullable=False),
    sa.Column("read_at", _timestamp, nullable=True),
    sa.UniqueConstraint("event_id", name="uq_notifications_event_id"),
    # Newest first per user (a backward scan), the page cursor being (created_at, id).
    sa.Index("ix_notifications_user_created", "user_id", "created_at", "id"),
)

deliveries = sa.Table(
    "deliveries",
    metadata,
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column(
        "notification_id",
        sa.Uuid,
        sa.ForeignKey("notifications.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("channel", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("due_at", _timestamp, nullable=False),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("sent_at", _timestamp, nullable=True),
    # One delivery per notification and channel: never two e-mails for one event.
    sa.UniqueConstraint("notification_id", "channel", name="uq_deliveries_notification_channel"),
    sa.Index("ix_deliveries_due", "due_at", postgresql_where=sa.text("status = 'pending'")),
)

preferences = sa.Table(
    "preferences",
    metadata,
    sa.Column("user_id", sa.BigInteger, primary_key=True),
    sa.Column("email", sa.Boolean, nullable=False),
    sa.Column("sms", sa.Boolean, nullable=False),
    sa.Column("push", sa.Boolean, nullable=False),
    sa.Column("language", sa.Text, nullable=True),
    sa.Column("updated_at", _timestamp, nullable=False, server_default=sa.func.now()),
)

recorded_messages = sa.Table(
    "recorded_messages",
    metadata,
    # The recording SMS/push adapter's log; keyed by delivery, so a repeat is one row.
    sa.Column("delivery_id", sa.Uuid, primary_key=True),
    sa.Column("channel", sa.Text, nullable=False),
    sa.Column("recipient", sa.Text, nullable=False),
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("recorded_at", _timestamp, nullable=False, server_default=sa.func.now()),
)
