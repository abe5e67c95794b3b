"""The top-up saga: reserved vouchers, pending top-ups and the keys that wait for them.

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

INSTANT = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column("vouchers", sa.Column("reserved_until", INSTANT, nullable=True))
    op.drop_constraint("ck_vouchers_status", "vouchers", type_="check")
    op.create_check_constraint(
        "ck_vouchers_status",
        "vouchers",
        "status IN ('active', 'reserved', 'used', 'expired', 'cancelled')",
    )
    op.create_check_constraint(
        "ck_vouchers_reserved_until",
        "vouchers",
        "(status = 'reserved') = (reserved_until IS NOT NULL)",
    )

    op.add_column("topups", sa.Column("voucher_code", sa.Text, nullable=True))
    op.add_column("topups", sa.Column("idempotency_key", sa.Text, nullable=True))
    op.add_column(
        "topups",
        sa.Column("updated_at", INSTANT, nullable=False, server_default=sa.func.now()),
    )
    op.drop_constraint("ck_topups_status", "topups", type_="check")
    op.create_check_constraint(
        "ck_topups_status", "topups", "status IN ('pending', 'succeeded', 'failed')"
    )
    # A voucher is held by at most one unsettled or successful top-up.
    op.drop_index("uq_topups_voucher_succeeded", table_name="topups")
    op.create_index(
        "uq_topups_voucher_held",
        "topups",
        ["voucher_id"],
        unique=True,
        postgresql_where=sa.text("voucher_id IS NOT NULL AND status IN ('pending', 'succeeded')"),
    )
    # The reconciler's scan: pending top-ups, oldest first.
    op.create_index(
        "ix_topups_pending_created",
        "topups",
        ["created_at"],
        postgresql_where=sa.text("status = 'pending'"),
    )

    op.add_column("idempotency_keys", sa.Column("transaction_id", sa.Text, nullable=True))


def downgrade() -> None:
    op.drop_column("idempotency_keys", "transaction_id")
    op.drop_index("ix_topups_pending_created", table_name="topups")
    op.drop_index("uq_topups_voucher_held", table_name="topups")
    op.execute("UPDATE topups SET status = 'failed' WHERE status = 'pending'")
    op.create_index(
        "uq_topups_voucher_succeeded",
        "topups",
        ["voucher_id"],
        unique=True,
        postgresql_where=sa.text("voucher_id IS NOT NULL AND status = 'succeeded'"),
    )
    op.drop_constraint("ck_topups_status", "topups", type_="check")
    op.create_check_constraint("ck_topups_status", "topups", "status IN ('succeeded', 'failed')")
    op.drop_column("topups", "updated_at")
    op.drop_column("topups", "idempotency_key")
    op.drop_column("topups", "voucher_code")
    op.drop_constraint("ck_vouchers_reserved_until", "vouchers", type_="check")
    op.execute("UPDATE vouchers SET status = 'active' WHERE status = 'reserved'")
    op.drop_constraint("ck_vouchers_status", "vouchers", type_="check")
    op.create_check_constraint(
        "ck_vouchers_status", "vouchers", "status IN ('active', 'used', 'expired', 'cancelled')"
    )
    op.drop_column("vouchers", "reserved_until")
