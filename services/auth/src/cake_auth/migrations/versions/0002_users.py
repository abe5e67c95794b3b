"""Users, with case-insensitive unique usernames and e-mails and unique phone numbers.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("fullname", sa.Text, nullable=False),
        sa.Column("email", sa.Text, nullable=False),
        sa.Column("username", sa.Text, nullable=False),
        sa.Column("phone", sa.Text, nullable=False),
        sa.Column("password_hash", sa.Text, nullable=False),
        sa.Column("birthday", sa.Date, nullable=True),
        sa.Column("role", sa.Text, nullable=False, server_default="user"),
        sa.Column("latest_login", _timestamp, nullable=True),
        sa.Column("created_at", _timestamp, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", _timestamp, nullable=False, server_default=sa.func.now()),
        sa.Column("version", sa.BigInteger, nullable=False, server_default=sa.text("1")),
        sa.CheckConstraint("role IN ('user', 'admin')", name="ck_users_role"),
    )
    # The index names are what the service maps a unique violation to a field with.
    op.create_index("uq_users_username_lower", "users", [sa.text("lower(username)")], unique=True)
    op.create_index("uq_users_email_lower", "users", [sa.text("lower(email)")], unique=True)
    op.create_index("uq_users_phone", "users", ["phone"], unique=True)


def downgrade() -> None:
    op.drop_table("users")
