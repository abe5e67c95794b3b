"""The security audit log: append-only (a trigger refuses UPDATE and DELETE).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_timestamp = sa.DateTime(timezone=True)

_APPEND_ONLY = """
CREATE FUNCTION security_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the security audit log is append-only';
END
$$
"""


def upgrade() -> None:
    op.create_table(
        "security_audit_events",
        sa.Column("event_id", sa.Uuid, primary_key=True),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("actor_user_id", sa.BigInteger, nullable=False),
        sa.Column("subject_user_id", sa.BigInteger, nullable=False),
        sa.Column("client_ip", sa.Text, nullable=False),
        sa.Column("details", sa.JSON, nullable=False),
        sa.Column("occurred_at", _timestamp, nullable=False),
        sa.Column("recorded_at", _timestamp, nullable=False),
    )
    op.create_index("ix_security_audit_time", "security_audit_events", ["occurred_at", "event_id"])
    op.create_index("ix_security_audit_type_time", "security_audit_events", ["type", "occurred_at"])
    op.create_index(
        "ix_security_audit_subject", "security_audit_events", ["subject_user_id", "occurred_at"]
    )
    op.create_index(
        "ix_security_audit_actor", "security_audit_events", ["actor_user_id", "occurred_at"]
    )
    op.execute(_APPEND_ONLY)
    op.execute(
        "CREATE TRIGGER tr_security_audit_append_only "
        "BEFORE UPDATE OR DELETE OR TRUNCATE ON security_audit_events "
        "FOR EACH STATEMENT EXECUTE FUNCTION security_audit_append_only()"
    )


def downgrade() -> None:
    op.drop_table("security_audit_events")
    op.execute("DROP FUNCTION security_audit_append_only()")
