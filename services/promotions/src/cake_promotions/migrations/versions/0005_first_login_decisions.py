"""First-login decisions (one per user, with its reason) and campaign status history, so a
late USER_FIRST_LOGIN event is decided by the login time, not the arrival time.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_timestamp = sa.DateTime(timezone=True)

_RECORD_STATUS_FUNCTION = """
CREATE FUNCTION record_campaign_status() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO campaign_status_changes (campaign_id, status, changed_at)
        VALUES (NEW.id, NEW.status, NEW.created_at);
    ELSIF NEW.status IS DISTINCT FROM OLD.status THEN
        INSERT INTO campaign_status_changes (campaign_id, status, changed_at)
        VALUES (NEW.id, NEW.status, clock_timestamp());
    END IF;
    RETURN NULL;
END
$$
"""


def upgrade() -> None:
    op.create_table(
        "campaign_status_changes",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column(
            "campaign_id",
            sa.BigInteger,
            sa.ForeignKey("promotion_campaigns.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("changed_at", _timestamp, nullable=False),
    )
    op.create_index(
        "ix_campaign_status_changes_campaign_time",
        "campaign_status_changes",
        ["campaign_id", "changed_at"],
    )
    # Existing campaigns: their status as of their creation (full and expired follow from
    # slots and dates, which are checked on their own).
    op.execute(
        "INSERT INTO campaign_status_changes (campaign_id, status, changed_at) "
        "SELECT id, CASE WHEN status = 'inactive' THEN 'inactive' ELSE 'active' END, "
        "created_at FROM promotion_campaigns"
    )
    # Every later status write is recorded by the database itself, whoever makes it.
    op.execute(_RECORD_STATUS_FUNCTION)
    op.execute(
        "CREATE TRIGGER tr_campaign_status_history "
        "AFTER INSERT OR UPDATE OF status ON promotion_campaigns "
        "FOR EACH ROW EXECUTE FUNCTION record_campaign_status()"
    )
    op.create_table(
        "first_login_decisions",
        sa.Column("user_id", sa.BigInteger, primary_key=True),
        sa.Column("event_id", sa.Uuid, nullable=True),
        sa.Column("login_at", _timestamp, nullable=False),
        sa.Column("decided_at", _timestamp, nullable=False),
        sa.Column("result", sa.Text, nullable=False),
        sa.Column("campaign_id", sa.BigInteger, nullable=True),
        sa.Column("reason", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER tr_campaign_status_history ON promotion_campaigns")
    op.execute("DROP FUNCTION record_campaign_status()")
    op.drop_table("first_login_decisions")
    op.drop_table("campaign_status_changes")
