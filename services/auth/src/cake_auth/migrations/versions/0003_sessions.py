"""Server-side sessions and their refresh tokens (one row per token ever issued, so the
reuse of a used one is recognised).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "sessions",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column(
            "user_id",
            sa.BigInteger,
            sa.ForeignKey("users.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("created_at", _timestamp, nullable=False),
        sa.Column("expires_at", _timestamp, nullable=False),
        sa.Column("ended_at", _timestamp, nullable=True),
        sa.Column("end_reason", sa.Text, nullable=True),
        sa.Column("user_agent", sa.Text, nullable=False, server_default=""),
        sa.Column("client_ip", sa.Text, nullable=False, server_default=""),
    )
    # logout-all and the admin end a user's live sessions.
    op.create_index(
        "ix_sessions_user_live",
        "sessions",
        ["user_id"],
        postgresql_where=sa.text("ended_at IS NULL"),
    )
    op.create_table(
        "refresh_tokens",
        sa.Column("token_hash", sa.Text, primary_key=True),
        sa.Column(
            "session_id",
            sa.Text,
            sa.ForeignKey("sessions.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("issued_at", _timestamp, nullable=False),
        sa.Column("used_at", _timestamp, nullable=True),
    )
    op.create_index("ix_refresh_tokens_session", "refresh_tokens", ["session_id"])


def downgrade() -> None:
    op.drop_table("refresh_tokens")
    op.drop_table("sessions")
