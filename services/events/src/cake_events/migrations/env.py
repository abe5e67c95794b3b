from cake_common.migrations import run_migrations

from cake_events.db import metadata

run_migrations(metadata)
