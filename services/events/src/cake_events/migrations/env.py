from cake_common.migrations import run_migrations

from cake_events.adapters.tables import metadata

run_migrations(metadata)
