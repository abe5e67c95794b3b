"""Campaigns, participations, vouchers, top-ups and top-up idempotency keys.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MONEY = sa.Numeric(14, 2)
PERCENTAGE = sa.Numeric(5, 2)
INSTANT = sa.DateTime(timezone=True)


def _timestamps() -> list[sa.Column[object]]:
    return [
        sa.Column("created_at", INSTANT, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", INSTANT, nullable=False, server_default=sa.func.now()),
    ]


def upgrade() -> None:
    op.create_table(
        "promotion_campaigns",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("description", sa.Text, nullable=False, server_default=""),
        sa.Column("type", sa.Text, nullable=False, server_default="first_login_discount"),
        sa.Column("status", sa.Text, nullable=False, server_default="active"),
        sa.Column("start_date", INSTANT, nullable=False),
        sa.Column("end_date", INSTANT, nullable=False),
        sa.Column("max_participants", sa.Integer, nullable=False, server_default="100"),
        sa.Column("current_participants", sa.Integer, nullable=False, server_default="0"),
        sa.Column("discount_percentage", PERCENTAGE, nullable=False, server_default="30"),
        sa.Column("min_topup_amount", MONEY, nullable=False, server_default="0"),
        sa.Column("max_discount_amount", MONEY, nullable=True),
        sa.Column("voucher_validity_days", sa.Integer, nullable=False, server_default="30"),
        *_timestamps(),
        sa.CheckConstraint("type IN ('first_login_discount')", name="ck_campaigns_type"),
        sa.CheckConstraint(
            "status IN ('active', 'inactive', 'expired', 'full')", name="ck_campaigns_status"
        ),
        sa.CheckConstraint("end_date > start_date", name="ck_campaigns_window"),
        sa.CheckConstraint("max_participants > 0", name="ck_campaigns_max_participants"),
        # The guarantee behind "exactly max vouchers": no update can overfill a campaign.
        sa.CheckConstraint(
            "current_participants >= 0 AND current_participants <= max_participants",
            name="ck_campaigns_participants",
        ),
        sa.CheckConstraint(
            "discount_percentage > 0 AND discount_percentage <= 100",
            name="ck_campaigns_discount_percentage",
        ),
        sa.CheckConstraint("min_topup_amount >= 0", name="ck_campaigns_min_topup_amount"),
        sa.CheckConstraint(
            "max_discount_amount IS NULL OR max_discount_amount >= 0",
            name="ck_campaigns_max_discount_amount",
        ),
        sa.CheckConstraint("voucher_validity_days > 0", name="ck_campaigns_validity_days"),
    )
    # Enrollment looks up the newest running campaign of a type on every first login.
    op.create_index(
        "ix_campaigns_type_status_created",
        "promotion_campaigns",
        ["type", "status", sa.text("created_at DESC")],
    )

    op.create_table(
        "user_promotions",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("user_id", sa.BigInteger, nullable=False),
        sa.Column(
            "campaign_id",
            sa.BigInteger,
            sa.ForeignKey("promotion_campaigns.id", name="fk_user_promotions_campaign"),
            nullable=False,
        ),
        sa.Column("participation_order", sa.Integer, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("first_login_at", INSTANT, nullable=False),
        sa.Column("voucher_issued_at", INSTANT, nullable=True),
        sa.Column("voucher_used_at", INSTANT, nullable=True),
        *_timestamps(),
        sa.UniqueConstraint("user_id", "campaign_id", name="uq_user_promotions_user_campaign"),
        sa.UniqueConstraint(
            "campaign_id", "participation_order", name="uq_user_promotions_campaign_order"
        ),
        sa.CheckConstraint("participation_order > 0", name="ck_user_promotions_order"),
        sa.CheckConstraint(
            "status IN ('eligible', 'voucher_issued', 'voucher_used', 'expired')",
            name="ck_user_promotions_status",
        ),
    )

    op.create_table(
        "vouchers",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("code", sa.Text, nullable=False),
        sa.Column(
            "user_promotion_id",
            sa.BigInteger,
            sa.ForeignKey("user_promotions.id", name="fk_vouchers_user_promotion"),
            nullable=False,
        ),
        sa.Column("user_id", sa.BigInteger, nullable=False),
        sa.Column("type", sa.Text, nullable=False, server_default="discount"),
        sa.Column("status", sa.Text, nullable=False, server_default="active"),
        sa.Column("discount_percentage", PERCENTAGE, nullable=False),
        sa.Column("min_topup_amount", MONEY, nullable=False),
        sa.Column("max_discount_amount", MONEY, nullable=True),
        sa.Column("issued_at", INSTANT, nullable=False),
        sa.Column("expires_at", INSTANT, nullable=False),
        sa.Column("used_at", INSTANT, nullable=True),
        sa.Column("used_amount", MONEY, nullable=True),
        sa.Column("discount_amount", MONEY, nullable=True),
        sa.Column("transaction_reference", sa.Text, nullable=True),
        *_timestamps(),
        sa.UniqueConstraint("code", name="uq_vouchers_code"),
        sa.CheckConstraint("code ~ '^CAKE-[A-Z0-9]{8}$'", name="ck_vouchers_code"),
        sa.CheckConstraint("type IN ('discount')", name="ck_vouchers_type"),
        sa.CheckConstraint(
            "status IN ('active', 'used', 'expired', 'cancelled')", name="ck_vouchers_status"
        ),
        sa.CheckConstraint(
            "status <> 'used' OR (used_at IS NOT NULL AND transaction_reference IS NOT NULL)",
            name="ck_vouchers_used_has_transaction",
        ),
    )
    op.create_index("ix_vouchers_user_issued", "vouchers", ["user_id", sa.text("issued_at DESC")])
    op.create_index("ix_vouchers_user_promotion", "vouchers", ["user_promotion_id"])

    op.create_table(
        "topups",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("transaction_id", sa.Text, nullable=False),
        sa.Column("user_id", sa.BigInteger, nullable=False),
        sa.Column("phone_number", sa.Text, nullable=False),
        sa.Column("original_amount", MONEY, nullable=False),
        sa.Column("discount_amount", MONEY, nullable=False),
        sa.Column("final_amount", MONEY, nullable=False),
        sa.Column(
            "voucher_id",
            sa.BigInteger,
            sa.ForeignKey("vouchers.id", name="fk_topups_voucher"),
            nullable=True,
        ),
        sa.Column("payment_method", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("created_at", INSTANT, nullable=False, server_default=sa.func.now()),
        sa.UniqueConstraint("transaction_id", name="uq_topups_transaction_id"),
        sa.CheckConstraint("status IN ('succeeded', 'failed')", name="ck_topups_status"),
        sa.CheckConstraint(
            "original_amount > 0 AND discount_amount >= 0 "
            "AND final_amount = original_amount - discount_amount",
            name="ck_topups_amounts",
        ),
    )
    op.create_index("ix_topups_user_created", "topups", ["user_id", "created_at"])
    # Second line of defence behind the voucher row lock: one successful top-up per voucher.
    op.create_index(
        "uq_topups_voucher_succeeded",
        "topups",
        ["voucher_id"],
        unique=True,
        postgresql_where=sa.text("voucher_id IS NOT NULL AND status = 'succeeded'"),
    )

    op.create_table(
        "idempotency_keys",
        sa.Column("user_id", sa.BigInteger, nullable=False),
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("request_fingerprint", sa.Text, nullable=False),
        # NULL only inside the transaction of the first request; committed rows hold the
        # serialized TopupResponse that retries get back.
        sa.Column("response", sa.LargeBinary, nullable=True),
        sa.Column("created_at", INSTANT, nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("user_id", "key", name="pk_idempotency_keys"),
    )


def downgrade() -> None:
    op.drop_table("idempotency_keys")
    op.drop_index("uq_topups_voucher_succeeded", table_name="topups")
    op.drop_index("ix_topups_user_created", table_name="topups")
    op.drop_table("topups")
    op.drop_index("ix_vouchers_user_promotion", table_name="vouchers")
    op.drop_index("ix_vouchers_user_issued", table_name="vouchers")
    op.drop_table("vouchers")
    op.drop_table("user_promotions")
    op.drop_index("ix_campaigns_type_status_created", table_name="promotion_campaigns")
    op.drop_table("promotion_campaigns")
