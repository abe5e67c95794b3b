from cake_common.migrations import run_migrations

from cake_auth.db import metadata

run_migrations(metadata)
