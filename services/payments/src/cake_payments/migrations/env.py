from cake_common.migrations import run_migrations

from cake_payments.adapters.tables import metadata

run_migrations(metadata)
