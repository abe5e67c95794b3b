"""Notifications, their deliveries per channel, preferences, the recorder's log, the inbox.

Revision ID: 0001
Revises:
Create Date: 2026-12-05
"""

from collections.abc import Sequence
from typing import cast

import sqlalchemy as sa
from alembic import op
from alembic.operations import Operations
from cake_common.inbox import create_inbox_table, drop_inbox_table
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OPERATIONS = cast(Operations, op)
_timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    create_inbox_table(OPERATIONS)
    op.create_table(
        "notifications",
        sa.Column("id", sa.Uuid, primary_key=True),
        sa.Column("user_id", sa.BigInteger, nullable=False),
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
        sa.CheckConstraint(
            "kind IN ('voucher_issued', 'voucher_used', 'payment_processed')",
            name="ck_notifications_kind",
        ),
    )
    op.create_index(
        "ix_notifications_user_created", "notifications", ["user_id", "created_at", "id"]
    )
    op.create_table(
        "deliveries",
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
        sa.UniqueConstraint(
            "notification_id", "channel", name="uq_deliveries_notification_channel"
        ),
        sa.CheckConstraint("channel IN ('email', 'sms', 'push')", name="ck_deliveries_channel"),
        sa.CheckConstraint("status IN ('pending', 'sent', 'failed')", name="ck_deliveries_status"),
    )
    op.create_index(
        "ix_deliveries_due",
        "deliveries",
        ["due_at"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_table(
        "preferences",
        sa.Column("user_id", sa.BigInteger, primary_key=True),
        sa.Column("email", sa.Boolean, nullable=False),
        sa.Column("sms", sa.Boolean, nullable=False),
        sa.Column("push", sa.Boolean, nullable=False),
        sa.Column("language", sa.Text, nullable=True),
        sa.Column("updated_at", _timestamp, nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint("language IN ('vi', 'en')", name="ck_preferences_language"),
    )
    op.create_table(
        "recorded_messages",
        sa.Column("delivery_id", sa.Uuid, primary_key=True),
        sa.Column("channel", sa.Text, nullable=False),
        sa.Column("recipient", sa.Text, nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("recorded_at", _timestamp, nullable=False, server_default=sa.func.now()),
    )


def downgrade() -> None:
    op.drop_table("recorded_messages")
    op.drop_table("preferences")
    op.drop_table("deliveries")
    op.drop_table("notifications")
    drop_inbox_table(OPERATIONS)
