"""Dead letters of the outbox relay.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    tz = sa.DateTime(timezone=True)
    op.create_table(
        "dead_letters",
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
        sa.Column("occurred_at", tz, nullable=False),
        sa.Column("failed_at", tz, nullable=False),
        sa.Column("retried_at", tz, nullable=True),
    )
    # Admins page through the parked (not retried) dead letters, newest first.
    op.create_index(
        "ix_dead_letters_parked",
        "dead_letters",
        [sa.text("failed_at DESC"), sa.text("event_id DESC")],
        postgresql_where=sa.text("retried_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_table("dead_letters")
