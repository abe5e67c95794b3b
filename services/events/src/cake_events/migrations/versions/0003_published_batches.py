"""Audit log: one row per published batch; ``published_events`` becomes a view of its lines.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25

The relay used to insert one ``published_events`` row per event, with two B-tree entries
each (a random UUID key and the publication time): the largest share of the database work
the relay does per event, on the same CPUs as the relay itself. Now each batch Kafka
acknowledged is one ``published_batches`` row whose ``lines`` column holds the batch's
columns as one JSON document (compressed by TOAST), and ``published_events`` is a view
with the same columns as the old table, so queries of the audit log read as before.
Every publication now gets its line: an event sent again (after a crash between Kafka's
acknowledgement and the marking of its row, or after a replay) appears once per
publication, with the partition and offset of each.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_LINES_VIEW = """
CREATE VIEW published_events AS
SELECT line.event_id::uuid AS event_id,
       batch.source,
       line.event_type,
       line.aggregate_id,
       line.topic,
       line.partition::integer AS partition,
       line.kafka_offset::bigint AS kafka_offset,
       batch.published_at
FROM published_batches AS batch
CROSS JOIN LATERAL ROWS FROM (
    json_array_elements_text(batch.lines -> 'event_id'),
    json_array_elements_text(batch.lines -> 'event_type'),
    json_array_elements_text(batch.lines -> 'aggregate_id'),
    json_array_elements_text(batch.lines -> 'topic'),
    json_array_elements_text(batch.lines -> 'partition'),
    json_array_elements_text(batch.lines -> 'kafka_offset')
) AS line (event_id, event_type, aggregate_id, topic, partition, kafka_offset)
"""


def _create_published_events_table() -> None:
    """The table as revision 0001 made it (restated, not imported: a migration is a frozen
    snapshot and must not change when another one does)."""
    op.create_table(
        "published_events",
        sa.Column("event_id", sa.Uuid, primary_key=True),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("event_type", sa.Text, nullable=False),
        sa.Column("aggregate_id", sa.Text, nullable=False),
        sa.Column("topic", sa.Text, nullable=False),
        sa.Column("partition", sa.Integer, nullable=False),
        sa.Column("kafka_offset", sa.BigInteger, nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_published_events_published_at", "published_events", ["published_at"])


def upgrade() -> None:
    op.create_table(
        "published_batches",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("event_count", sa.Integer, nullable=False),
        sa.Column("lines", sa.JSON, nullable=False),
        sa.CheckConstraint("event_count > 0", name="ck_published_batches_event_count"),
    )
    op.create_index("ix_published_batches_published_at", "published_batches", ["published_at"])
    # LZ4 compresses a batch's lines about ten times faster than PostgreSQL's default; a
    # server built without it keeps the default. In SQL, so `alembic upgrade --sql` works too.
    op.execute("""
DO $$
BEGIN
    EXECUTE 'ALTER TABLE published_batches ALTER COLUMN lines SET COMPRESSION lz4';
EXCEPTION WHEN feature_not_supported THEN
    RAISE NOTICE 'lz4 is not available: published_batches.lines keeps the default compression';
END
$$""")
    # Lines logged before: one batch per source and publication time (a relay batch), in
    # publication order as far as it can be told (per partition, by offset); the same order
    # in all six aggregates keeps the arrays parallel.
    op.execute("""
INSERT INTO published_batches (source, published_at, event_count, lines)
SELECT source, published_at, count(*), json_build_object(
    'event_id', json_agg(event_id ORDER BY topic, partition, kafka_offset, event_id),
    'event_type', json_agg(event_type ORDER BY topic, partition, kafka_offset, event_id),
    'aggregate_id', json_agg(aggregate_id ORDER BY topic, partition, kafka_offset, event_id),
    'topic', json_agg(topic ORDER BY topic, partition, kafka_offset, event_id),
    'partition', json_agg(partition ORDER BY topic, partition, kafka_offset, event_id),
    'kafka_offset', json_agg(kafka_offset ORDER BY topic, partition, kafka_offset, event_id)
)
FROM published_events
GROUP BY source, published_at
""")
    op.drop_table("published_events")
    op.execute(_LINES_VIEW)


def downgrade() -> None:
    op.execute("ALTER VIEW published_events RENAME TO published_event_lines")
    _create_published_events_table()
    # The old table kept an event's first publication only.
    op.execute(
        "INSERT INTO published_events SELECT DISTINCT ON (event_id) * FROM published_event_lines "
        "ORDER BY event_id, published_at, kafka_offset"
    )
    op.execute("DROP VIEW published_event_lines")
    op.drop_table("published_batches")
