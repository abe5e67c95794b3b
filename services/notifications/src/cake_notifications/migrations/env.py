from cake_common.migrations import run_migrations

from cake_notifications.adapters.tables import metadata

run_migrations(metadata)
