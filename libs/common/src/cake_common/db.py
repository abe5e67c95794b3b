"""PostgreSQL access: async engine (psycopg 3), start-up wait, health probe, unit of work."""

from __future__ import annotations

import select
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, Self

import psycopg
import sqlalchemy.exc
from pydantic import SecretStr
from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from cake_common.logging import get_logger
from cake_common.startup_retry import startup_retrying

_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    psycopg.OperationalError,  # raised by the driver directly (LISTEN, raw connections)
    OSError,
)


def is_connection_error(error: BaseException) -> bool:
    """True if ``error`` says the database could not be reached or the connection broke
    (not that a statement was wrong); a task group's ``ExceptionGroup`` counts when any of
    its errors does."""
    if isinstance(error, BaseExceptionGroup):
        return error.subgroup(_CONNECTION_ERRORS) is not None
    return isinstance(error, _CONNECTION_ERRORS)


_log = get_logger(__name__)


def _plain(url: str | SecretStr) -> str:
    return url.get_secret_value() if isinstance(url, SecretStr) else url


@dataclass(frozen=True, slots=True)
class SessionTimeouts:
    """PostgreSQL's own limits on every session of an engine, in milliseconds (0: none).

    The server enforces them whatever the client does: a statement running too long, a
    lock waited for too long, or a transaction left open while the client does something
    else is cancelled, so no row lock or connection is held without bound.
    """

    statement_ms: int = 30_000
    lock_ms: int = 5_000
    idle_in_transaction_ms: int = 30_000

    def options(self) -> str:
        """The libpq ``options`` that set them at connection start."""
        return (
            f"-c statement_timeout={self.statement_ms}"
            f" -c lock_timeout={self.lock_ms}"
            f" -c idle_in_transaction_session_timeout={self.idle_in_transaction_ms}"
        )


def create_async_engine_for(
    url: str | SecretStr,
    *,
    pool_size: int = 10,
    max_overflow: int = 5,
    pool_timeout_seconds: float = 5.0,
    connect_timeout_seconds: int = 5,
    application_name: str | None = None,
    session_timeouts: SessionTimeouts | None = None,
    **engine_kwargs: Any,
) -> AsyncEngine:
    """An async engine on ``postgresql+psycopg://…`` tuned to fail fast when Postgres is down.

    A connection that died while idle in the pool (a Postgres restart, a terminated backend,
    a server-side idle timeout) is replaced at checkout instead of failing the next request,
    without a round trip (:func:`_drop_if_server_spoke`, not ``pool_pre_ping``); one that
    breaks in use fails that request with a connection error, and SQLAlchemy then recycles
    every connection of the pool opened before it; short pool/connect timeouts turn an outage (or an
    exhausted pool) into a quick UNAVAILABLE rather than requests piling up;
    ``session_timeouts`` bound what one session may hold; ``hide_parameters`` keeps bound
    values (emails, hashes) out of error messages and therefore out of logs.
    """
    connect_args: dict[str, Any] = {"connect_timeout": connect_timeout_seconds}
    if application_name is not None:
        connect_args["application_name"] = application_name
    if session_timeouts is not None:
        connect_args["options"] = session_timeouts.options()
    connect_args.update(engine_kwargs.pop("connect_args", {}))
    engine = create_async_engine(
        _plain(url),
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=pool_timeout_seconds,
        hide_parameters=True,
        connect_args=connect_args,
        **engine_kwargs,
    )
    event.listen(engine.sync_engine, "checkout", _drop_if_server_spoke)
    return engine


def _server_spoke(connection: Any) -> bool:
    """Whether the server sent anything (or closed) while the connection sat idle in the
    pool: an idle PostgreSQL session receives nothing unless it is being ended (the FATAL
    of a shutdown or ``pg_terminate_backend``, a timeout) or its socket was closed (EOF),
    so a readable socket means it is dead (or, rarely, has an asynchronous notice: replacing
    it then costs one reconnect). ``connection`` is psycopg's, its socket a plain fd."""
    if connection.closed:
        return True
    poller = select.poll()
    poller.register(connection.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
    return bool(poller.poll(0))


def _drop_if_server_spoke(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    """Pool ``checkout`` event: refuse a connection the server has ended while it was idle.

    Hand-written instead of ``pool_pre_ping``: the ping is a round trip (``SELECT 1``) on
    every checkout, paid by every request of every service; a non-blocking ``poll`` of the
    socket is a system call. Raising ``DisconnectionError`` here is SQLAlchemy's documented
    way to make the pool discard the connection and hand out a fresh one (it retries the
    checkout). A peer that vanished without closing (a cut network) is not seen here; its
    first statement fails with a connection error instead, as it would after a ping.
    """
    driver_connection = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    if _server_spoke(driver_connection):
        _log.info("pooled database connection was closed by the server; reconnecting")
        raise sqlalchemy.exc.DisconnectionError("connection closed by the server while idle")


def libpq_url(url: str | SecretStr) -> str:
    """The SQLAlchemy URL as a plain ``postgresql://`` conninfo for ``psycopg.connect``
    (e.g. for a LISTEN connection that lives outside the pool)."""
    return make_url(_plain(url)).set(drivername="postgresql").render_as_string(hide_password=False)


async def wait_for_database(engine: AsyncEngine, timeout_seconds: float) -> None:
    """Return once ``SELECT 1`` succeeds, retrying with backoff for up to ``timeout_seconds``."""
    async for attempt in startup_retrying(
        "postgres", timeout_seconds=timeout_seconds, retry_on=_CONNECTION_ERRORS
    ):
        with attempt:
            async with engine.connect() as connection:
                await connection.execute(text("SELECT 1"))


def database_probe(engine: AsyncEngine) -> Callable[[], Awaitable[None]]:
    """A ``SELECT 1`` probe for :class:`~cake_common.grpc_server.DependencyCheck`."""

    async def probe() -> None:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    return probe


def create_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    # expire_on_commit=False: objects returned by a use case stay readable after commit
    # without lazy reloads (which async sessions cannot do implicitly).
    return async_sessionmaker(engine, expire_on_commit=False)


class TransactionPort(Protocol):
    """What a use case needs of any unit of work: ``async with`` it, then ``commit`` (leaving
    without committing rolls back). Services' ports extend it with their repositories."""

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None: ...

    async def commit(self) -> None: ...


class UnitOfWork:
    """One database transaction around a use case; rolls back unless committed.

    ::

        async with uow:
            user = await uow.users.get(user_id)
            ...
            await uow.commit()

    Subclasses attach repositories in :meth:`bind_repositories`.
    """

    def __init__(self, session_factory: async_sessionmaker[AsyncSession]) -> None:
        self._session_factory = session_factory
        self._session: AsyncSession | None = None

    @property
    def session(self) -> AsyncSession:
        if self._session is None:
            raise RuntimeError("the unit of work is used outside `async with`")
        return self._session

    def bind_repositories(self, session: AsyncSession) -> None:
        """Create this unit of work's repositories on ``session``; override in subclasses."""

    async def __aenter__(self) -> Self:
        if self._session is not None:
            raise RuntimeError("the unit of work is already in use")
        self._session = self._session_factory()
        self.bind_repositories(self._session)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        session, self._session = self.session, None
        try:
            # Rolls back whatever was not committed: commit is always explicit.
            await session.close()
        except Exception:
            if exc is None:
                raise
            # The connection broke too (e.g. Postgres went away): the use case's own
            # error explains the failure better than the failed rollback does.
            _log.debug("rollback after a failed unit of work also failed", exc_info=True)

    async def commit(self) -> None:
        await self.session.commit()

    async def rollback(self) -> None:
        await self.session.rollback()
