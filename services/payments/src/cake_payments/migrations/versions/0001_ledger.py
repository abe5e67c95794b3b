"""The bank's ledger: one entry per transaction id (charged, declined or voided).

Revision ID: 0001
Revises:
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "ledger",
        sa.Column("transaction_id", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("user_id", sa.BigInteger, nullable=True),
        sa.Column("amount", sa.Numeric(14, 2), nullable=True),
        sa.Column("payment_method", sa.Text, nullable=True),
        sa.Column("phone_number", sa.Text, nullable=True),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column(
            "recorded_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.PrimaryKeyConstraint("transaction_id", name="pk_ledger"),
        sa.CheckConstraint("status IN ('charged', 'declined', 'voided')", name="ck_ledger_status"),
        # A voided id was never charged, so it has no amount; the others always do.
        sa.CheckConstraint("(status = 'voided') = (amount IS NULL)", name="ck_ledger_amount"),
    )


def downgrade() -> None:
    op.drop_table("ledger")
