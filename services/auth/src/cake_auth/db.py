"""Tables of the auth database (SQLAlchemy Core; the schema itself is made by migrations)."""

from __future__ import annotations

import sqlalchemy as sa
from cake_common.outbox import outbox_table

# Unique indexes named so a violation maps to the field it concerns (see the repository).
USERNAME_UNIQUE_INDEX = "uq_users_username_lower"
EMAIL_UNIQUE_INDEX = "uq_users_email_lower"
PHONE_UNIQUE_INDEX = "uq_users_phone"
ROLE_CHECK = "ck_users_role"

metadata = sa.MetaData()
outbox = outbox_table(metadata)

_timestamp = sa.DateTime(timezone=True)

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("fullname", sa.Text, nullable=False),
    sa.Column("email", sa.Text, nullable=False),
    sa.Column("username", sa.Text, nullable=False),
    sa.Column("phone", sa.Text, nullable=False),
    sa.Column("password_hash", sa.Text, nullable=False),
    # NULL only for administrators created from the command line without one.
    sa.Column("birthday", sa.Date, nullable=True),
    sa.Column("role", sa.Text, nullable=False, server_default="user"),
    sa.Column("latest_login", _timestamp, nullable=True),
    sa.Column("created_at", _timestamp, nullable=False, server_default=sa.func.now()),
    sa.Column("updated_at", _timestamp, nullable=False, server_default=sa.func.now()),
    sa.Column("version", sa.BigInteger, nullable=False, server_default=sa.text("1")),
    sa.CheckConstraint("role IN ('user', 'admin')", name=ROLE_CHECK),
    sa.Index(USERNAME_UNIQUE_INDEX, sa.func.lower(sa.text("username")), unique=True),
    sa.Index(EMAIL_UNIQUE_INDEX, sa.func.lower(sa.text("email")), unique=True),
    sa.Index(PHONE_UNIQUE_INDEX, "phone", unique=True),
)


sessions = sa.Table(
    "sessions",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column(
        "user_id", sa.BigInteger, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("created_at", _timestamp, nullable=False),
    sa.Column("expires_at", _timestamp, nullable=False),
    sa.Column("ended_at", _timestamp, nullable=True),
    sa.Column("end_reason", sa.Text, nullable=True),
    sa.Column("user_agent", sa.Text, nullable=False, server_default=""),
    sa.Column("client_ip", sa.Text, nullable=False, server_default=""),
    sa.Index("ix_sessions_user_live", "user_id", postgresql_where=sa.text("ended_at IS NULL")),
)

refresh_tokens = sa.Table(
    "refresh_tokens",
    metadata,
    sa.Column("token_hash", sa.Text, primary_key=True),
    sa.Column(
        "session_id", sa.Text, sa.ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("issued_at", _timestamp, nullable=False),
    sa.Column("used_at", _timestamp, nullable=True),
    sa.Index("ix_refresh_tokens_session", "session_id"),
)


service_accounts = sa.Table(
    "service_accounts",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("client_id", sa.Text, nullable=False, unique=True),
    # SHA-256 of the client secret (256 random bits); the secret itself is never stored.
    sa.Column("secret_hash", sa.Text, nullable=False),
    sa.Column("scopes", sa.ARRAY(sa.Text), nullable=False),
    # The `sid` of the account's tokens; replaced (and the old one revoked) on rotation or
    # disabling.
    sa.Column("generation", sa.Text, nullable=False),
    sa.Column("created_at", _timestamp, nullable=False),
    sa.Column("updated_at", _timestamp, nullable=False),
    sa.Column("disabled_at", _timestamp, nullable=True),
)
