"""The outbox/inbox layouts are a cross-service contract: pin them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from cake.events.v1 import payloads_pb2, registry
from cake_common.inbox import inbox_table
from cake_common.outbox import OutboxWriter, grant_outbox_to_relay_sql, outbox_table

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


class _RecordingExecutor:
    """Stands in for a session: records what would have been executed."""

    def __init__(self) -> None:
        self.statements: list[Any] = []

    async def execute(self, statement: Any) -> None:
        self.statements.append(statement)


async def test_the_event_type_names_the_row_and_its_payload_must_match() -> None:
    executor = _RecordingExecutor()
    writer = OutboxWriter()
    occurred = datetime(2026, 1, 2, tzinfo=UTC)
    with pytest.raises(TypeError, match=r"USER_FIRST_LOGIN carries cake\.events\.v1\.UserFirst"):
        await writer.add(
            executor,  # type: ignore[arg-type]
            registry.USER_FIRST_LOGIN,
            aggregate_id=1,
            payload=payloads_pb2.VoucherUsed(),  # type: ignore[arg-type]
            occurred_at=occurred,
        )
    assert executor.statements == []

    await writer.add(
        executor,  # type: ignore[arg-type]
        registry.VOUCHER_USED,
        aggregate_id=7,
        payload=payloads_pb2.VoucherUsed(voucher_id=3),
        occurred_at=occurred,
    )
    (statement,) = executor.statements
    values = statement.compile().params
    assert (values["event_type"], values["aggregate_type"], values["payload_type"]) == (
        "VOUCHER_USED",
        "user",
        "cake.events.v1.VoucherUsed",
    )
