"""Tables of the promotions database (SQLAlchemy Core; the schema is made by migrations).

Users live in the auth service's database, so ``user_id`` columns carry no foreign key: the
ids come from verified tokens or from auth's events.
"""

from __future__ import annotations

import sqlalchemy as sa
from cake_common.inbox import inbox_table
from cake_common.outbox import outbox_table

metadata = sa.MetaData()
outbox = outbox_table(metadata)
inbox = inbox_table(metadata)

_Money = sa.Numeric(14, 2, asdecimal=True)
_Percentage = sa.Numeric(5, 2, asdecimal=True)
_Instant = sa.DateTime(timezone=True)


def _timestamps() -> list[sa.Column[object]]:
    return [
        sa.Column("created_at", _Instant, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", _Instant, nullable=False, server_default=sa.func.now()),
    ]


campaigns = sa.Table(
    "promotion_campaigns",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("type", sa.Text, nullable=False, server_default="first_login_discount"),
    sa.Column("status", sa.Text, nullable=False, server_default="active"),
    sa.Column("start_date", _Instant, nullable=False),
    sa.Column("end_date", _Instant, nullable=False),
    sa.Column("max_participants", sa.Integer, nullable=False, server_default="100"),
    sa.Column("current_participants", sa.Integer, nullable=False, server_default="0"),
    sa.Column("discount_percentage", _Percentage, nullable=False, server_default="30"),
    sa.Column("min_topup_amount", _Money, nullable=False, server_default="0"),
    sa.Column("max_discount_amount", _Money, nullable=True),
    sa.Column("voucher_validity_days", sa.Integer, nullable=False, server_default="30"),
    *_timestamps(),
    sa.Index("ix_campaigns_type_status_created", "type", "status", sa.text("created_at DESC")),
)

user_promotions = sa.Table(
    "user_promotions",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("user_id", sa.BigInteger, nullable=False),
    sa.Column(
        "campaign_id", sa.BigInteger, sa.ForeignKey("promotion_campaigns.id"), nullable=False
    ),
    sa.Column("participation_order", sa.Integer, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("first_login_at", _Instant, nullable=False),
    sa.Column("voucher_issued_at", _Instant, nullable=True),
    sa.Column("voucher_used_at", _Instant, nullable=True),
    *_timestamps(),
    sa.UniqueConstraint("user_id", "campaign_id", name="uq_user_promotions_user_campaign"),
    sa.UniqueConstraint(
        "campaign_id", "participation_order", name="uq_user_promotions_campaign_order"
    ),
)

vouchers = sa.Table(
    "vouchers",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("code", sa.Text, nullable=False, unique=True),
    sa.Column(
        "user_promotion_id", sa.BigInteger, sa.ForeignKey("user_promotions.id"), nullable=False
    ),
    sa.Column("user_id", sa.BigInteger, nullable=False),
    sa.Column("type", sa.Text, nullable=False, server_default="discount"),
    sa.Column("status", sa.Text, nullable=False, server_default="active"),
    sa.Column("discount_percentage", _Percentage, nullable=False),
    sa.Column("min_topup_amount", _Money, nullable=False),
    sa.Column("max_discount_amount", _Money, nullable=True),
    sa.Column("issued_at", _Instant, nullable=False),
    sa.Column("expires_at", _Instant, nullable=False),
    sa.Column("used_at", _Instant, nullable=True),
    sa.Column("used_amount", _Money, nullable=True),
    sa.Column("discount_amount", _Money, nullable=True),
    sa.Column("transaction_reference", sa.Text, nullable=True),
    sa.Column("reserved_until", _Instant, nullable=True),
    *_timestamps(),
    sa.Index("ix_vouchers_user_issued", "user_id", sa.text("issued_at DESC")),
    sa.Index("ix_vouchers_user_promotion", "user_promotion_id"),
)

topups = sa.Table(
    "topups",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("transaction_id", sa.Text, nullable=False, unique=True),
    sa.Column("user_id", sa.BigInteger, nullable=False),
    sa.Column("phone_number", sa.Text, nullable=False),
    sa.Column("original_amount", _Money, nullable=False),
    sa.Column("discount_amount", _Money, nullable=False),
    sa.Column("final_amount", _Money, nullable=False),
    sa.Column("voucher_id", sa.BigInteger, sa.ForeignKey("vouchers.id"), nullable=True),
    sa.Column("payment_method", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("created_at", _Instant, nullable=False, server_default=sa.func.now()),
    sa.Column("voucher_code", sa.Text, nullable=True),
    sa.Column("idempotency_key", sa.Text, nullable=True),
    sa.Column("updated_at", _Instant, nullable=False, server_default=sa.func.now()),
    sa.Index("ix_topups_user_created", "user_id", "created_at"),
    # Second line of defence behind the voucher row lock: one live top-up per voucher.
    sa.Index(
        "uq_topups_voucher_held",
        "voucher_id",
        unique=True,
        postgresql_where=sa.text("voucher_id IS NOT NULL AND status IN ('pending', 'succeeded')"),
    ),
    sa.Index(
        "ix_topups_pending_created", "created_at", postgresql_where=sa.text("status = 'pending'")
    ),
)

idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    sa.Column("user_id", sa.BigInteger, primary_key=True),
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("request_fingerprint", sa.Text, nullable=False),
    sa.Column("response", sa.LargeBinary, nullable=True),
    sa.Column("transaction_id", sa.Text, nullable=True),
    sa.Column("created_at", _Instant, nullable=False, server_default=sa.func.now()),
    sa.Index("ix_idempotency_keys_created_at", "created_at"),
)


campaign_status_changes = sa.Table(
    "campaign_status_changes",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column(
        "campaign_id",
        sa.BigInteger,
        sa.ForeignKey("promotion_campaigns.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_campaign_status_changes_campaign_time", "campaign_id", "changed_at"),
)

first_login_decisions = sa.Table(
    "first_login_decisions",
    metadata,
    sa.Column("user_id", sa.BigInteger, primary_key=True),
    sa.Column("event_id", sa.Uuid, nullable=True),
    sa.Column("login_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("result", sa.Text, nullable=False),
    sa.Column("campaign_id", sa.BigInteger, nullable=True),
    sa.Column("reason", sa.Text, nullable=False),
)
