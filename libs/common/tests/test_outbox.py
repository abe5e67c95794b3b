"""The outbox/inbox layouts are a cross-service contract: pin them."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from cake_common.inbox import inbox_table
from cake_common.outbox import grant_outbox_to_relay_sql, outbox_table

OUTBOX_CONTRACT = {
    "id": ("BIGINT", False),
    "event_id": ("UUID", False),
    "event_type": ("TEXT", False),
    "aggregate_type": ("TEXT", False),
    "aggregate_id": ("TEXT", False),
    "payload": ("BYTEA", False),
    "payload_type": ("TEXT", False),
    "occurred_at": ("TIMESTAMP WITH TIME ZONE", False),
    "trace_parent": ("TEXT", True),
    "created_at": ("TIMESTAMP WITH TIME ZONE", False),
    "published_at": ("TIMESTAMP WITH TIME ZONE", True),
    "attempts": ("INTEGER", False),
    "next_attempt_at": ("TIMESTAMP WITH TIME ZONE", True),
    "last_error": ("TEXT", True),
    "dead_lettered_at": ("TIMESTAMP WITH TIME ZONE", True),
}


def _ddl(table: sa.Table) -> str:
    from sqlalchemy.dialects import postgresql
    from sqlalchemy.schema import CreateTable

    return str(CreateTable(table).compile(dialect=postgresql.dialect()))


def test_outbox_columns_match_contract() -> None:
    table = outbox_table(sa.MetaData())
    from sqlalchemy.dialects import postgresql

    dialect = postgresql.dialect()
    actual = {
        column.name: (column.type.compile(dialect=dialect), column.nullable)
        for column in table.columns
    }
    assert actual == OUTBOX_CONTRACT
    ddl = _ddl(table)
    assert "BIGSERIAL" in ddl
    assert "UNIQUE (event_id)" in ddl
    assert list(table.primary_key.columns.keys()) == ["id"]
    (index,) = table.indexes
    assert index.name == "ix_outbox_unpublished"
    assert str(index.dialect_options["postgresql"]["where"]) == "published_at IS NULL"


def test_inbox_layout() -> None:
    table = inbox_table(sa.MetaData())
    assert list(table.primary_key.columns.keys()) == ["event_id", "consumer"]
    assert [column.name for column in table.columns] == ["event_id", "consumer", "processed_at"]


def test_grant_sql_is_guarded_by_role_existence() -> None:
    sql = grant_outbox_to_relay_sql("cake_relay")
    assert "pg_roles WHERE rolname = 'cake_relay'" in sql
    assert "GRANT SELECT, UPDATE, DELETE ON TABLE %I TO %I" in sql


@pytest.mark.parametrize("role", ["Cake", "x'; DROP TABLE outbox; --", "", "a" * 64, "1abc"])
def test_grant_sql_rejects_unsafe_role_names(role: str) -> None:
    with pytest.raises(ValueError, match="relay role"):
        grant_outbox_to_relay_sql(role)
