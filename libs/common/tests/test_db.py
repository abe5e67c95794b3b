from __future__ import annotations

from cake_common.db import create_async_engine_for, libpq_url
from pydantic import SecretStr


def test_libpq_url_strips_driver_and_keeps_credentials() -> None:
    url = SecretStr("postgresql+psycopg://u:p%40ss@h:5/db")
    assert libpq_url(url) == "postgresql://u:p%40ss@h:5/db"


async def test_engine_is_lazy_and_configured() -> None:
    # Creating an engine connects to nothing (port 1 is closed): it is safe in a composition root.
    engine = create_async_engine_for(
        SecretStr("postgresql+psycopg://u:pw@127.0.0.1:1/db"),
        pool_size=3,
        application_name="cake-test",
        connect_args={"options": "-c statement_timeout=5000"},
    )
    try:
        assert engine.pool.size() == 3  # type: ignore[attr-defined]
        assert engine.dialect.driver == "psycopg"
        assert engine.url.password == "pw"
        assert "pw" not in repr(engine)
    finally:
        await engine.dispose()
