from cake_common.migrations import run_migrations

from cake_payments.db import metadata

run_migrations(metadata)
