from cake_common.migrations import run_migrations

from cake_auth.adapters.tables import metadata

run_migrations(metadata)
