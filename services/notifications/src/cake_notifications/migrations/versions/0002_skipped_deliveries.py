"""A delivery can be skipped: the user has no contact on its channel (no phone, no push
token) or auth does not know them. A normal outcome, neither sent nor failed.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_constraint("ck_deliveries_status", "deliveries", type_="check")
    op.create_check_constraint(
        "ck_deliveries_status", "deliveries", "status IN ('pending', 'sent', 'failed', 'skipped')"
    )


def downgrade() -> None:
    op.execute("UPDATE deliveries SET status = 'failed' WHERE status = 'skipped'")
    op.drop_constraint("ck_deliveries_status", "deliveries", type_="check")
    op.create_check_constraint(
        "ck_deliveries_status", "deliveries", "status IN ('pending', 'sent', 'failed')"
    )
