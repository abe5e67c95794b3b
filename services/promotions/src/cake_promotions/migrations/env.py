from cake_common.migrations import run_migrations

from cake_promotions.adapters.tables import metadata

run_migrations(metadata)
