"""Tables of the bank's own database (SQLAlchemy Core; the schema is made by migrations)."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

ledger = sa.Table(
    "ledger",
    metadata,
    # The caller's transaction id: one entry per id is what makes charging idempotent.
    sa.Column("transaction_id", sa.Text, primary_key=True),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("user_id", sa.BigInteger, nullable=True),
    sa.Column("amount", sa.Numeric(14, 2, asdecimal=True), nullable=True),
    sa.Column("payment_method", sa.Text, nullable=True),
    sa.Column("phone_number", sa.Text, nullable=True),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column(
        "recorded_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
)
