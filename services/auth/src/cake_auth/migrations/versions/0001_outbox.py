"""Outbox table read by the events relay.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from collections.abc import Sequence
from typing import cast

from alembic import op
from alembic.operations import Operations
from cake_common.migrations import migration_relay_role
from cake_common.outbox import create_outbox_table, drop_outbox_table

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # `op` is a module proxying an Operations object.
    create_outbox_table(cast(Operations, op), relay_role=migration_relay_role())


def downgrade() -> None:
    drop_outbox_table(cast(Operations, op))
