"""Outbox table read by the events relay; inbox table for consumed events.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from collections.abc import Sequence
from typing import cast

from alembic import op
from alembic.operations import Operations
from cake_common.inbox import create_inbox_table, drop_inbox_table
from cake_common.migrations import migration_relay_role
from cake_common.outbox import create_outbox_table, drop_outbox_table

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# `op` is a module proxying an Operations object.
OPERATIONS = cast(Operations, op)


def upgrade() -> None:
    create_outbox_table(OPERATIONS, relay_role=migration_relay_role())
    create_inbox_table(OPERATIONS)


def downgrade() -> None:
    drop_inbox_table(OPERATIONS)
    drop_outbox_table(OPERATIONS)
