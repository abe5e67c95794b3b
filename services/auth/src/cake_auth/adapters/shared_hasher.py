"""One set of hashing engines for every worker process of the auth service.

With several worker processes (``CAKE_AUTH_WORKERS``), each used to run its own engines and
the gateway alternates logins between workers, so two logins a few milliseconds apart
rarely met on one engine, and a login at a moderate rate always ran alone at full price (see
:mod:`cake_auth.adapters.hash_pairing`). Here the supervisor runs the engines
(:class:`HashServer`, around a :class:`~cake_auth.adapters.password_hashers.LanesHasher`) and
the workers ask it for digests over a Unix socket (:class:`RemoteLanesHasher`), so every
check of the host can pair with every other.

What crosses the socket is the key bytes, the salt and the cost, and the 23 digest bytes
back; the hash strings, the comparison and pyca bcrypt's refusals stay in the worker
(:class:`~cake_auth.adapters.password_hashers.DigestHasher`). One connection per worker,
requests multiplexed by a number. The socket lives in the workers' socket directory, readable
and writable by the service's own user only (mode 0600: password keys cross it).

Hand-written framing (two fixed-size headers over asyncio streams): a gRPC or HTTP server in
the supervisor would cost more per check than the hash saves, and multiprocessing's managers
block a thread per call.

Faults: a worker whose connection breaks fails the checks in flight with UNAVAILABLE (the
caller may retry; the login throttle does not count them) and reconnects on its next check.
The supervisor outlives its workers (they stop when it goes), so this only happens while the
unit stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Final

from cake_bcrypt import KEY_MAX_BYTES, SALT_BYTES, EngineClosedError
from cake_common.errors import Unavailable
from cake_common.logging import get_logger

from cake_auth.adapters.password_hashers import DigestHasher, LanesHasher, bcrypt_verify

_log = get_logger(__name__)

# request: number, cost, key length, salt; then the key bytes.
_REQUEST: Final = struct.Struct("!IBB16s")
# answer: number, status, digest (zeros unless OK).
_ANSWER: Final = struct.Struct("!IB23s")
_OK, _REFUSED, _FAILED = 0, 1, 2
_NO_DIGEST: Final = bytes(23)

HASHING_UNAVAILABLE = "Password checks are unavailable, try again in a moment"


class HashingUnavailable(Unavailable):
    """The supervisor's engines cannot be reached (UNAVAILABLE, retry-after 1 s)."""

    default_reason = "HASHING_UNAVAILABLE"

    def __init__(self) -> None:
        super().__init__(HASHING_UNAVAILABLE, retry_after_seconds=1)


def hasher_socket_path(socket_dir: Path, service: str) -> Path:
    """Where ``service``'s supervisor serves its engines: ``<socket_dir>/<service>-hasher.sock``."""
    return socket_dir / f"{service}-hasher.sock"


class HashServer:
    """Serves ``hasher``'s digests on the Unix socket ``path`` (in the running event loop)."""

    def __init__(self, hasher: LanesHasher, path: Path) -> None:
        self._hasher = hasher
        self._path = path
        self._server: asyncio.AbstractServer | None = None
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()  # a stopped supervisor's leftover (workers' sockets are checked)
        self._server = await asyncio.start_unix_server(self._serve, path=str(self._path))
        os.chmod(self._path, 0o600)
        _log.info(
            "shared hashing engines ready",
            socket=str(self._path),
            engines=self._hasher.workers,
            lanes=self._hasher.lanes,
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            # Closing a connection ends its reads (its handler returns, its checks are dropped).
            for writer in self._connections.values():
                writer.close()
            await asyncio.gather(*self._connections, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = asyncio.current_task()
        assert connection is not None
        self._connections[connection] = writer
        answers: set[asyncio.Task[None]] = set()
        try:
            while True:
                number, cost, length, salt = _REQUEST.unpack(
                    await reader.readexactly(_REQUEST.size)
                )
                key = await reader.readexactly(length)
                answer = asyncio.ensure_future(self._answer(writer, number, key, salt, cost))
                answers.add(answer)
                answer.add_done_callback(answers.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the worker closed its end
        finally:
            self._connections.pop(connection, None)
            for answer in list(answers):
                answer.cancel()
            writer.close()

    async def _answer(
        self, writer: asyncio.StreamWriter, number: int, key: bytes, salt: bytes, cost: int
    ) -> None:
        status, digest = _OK, _NO_DIGEST
        try:
            digest = await self._hasher.digest(key, salt, cost)
        except ValueError:
            status = _REFUSED  # a key, salt or cost bcrypt does not take
        except EngineClosedError:
            status = _FAILED
        if not writer.is_closing():
            writer.write(_ANSWER.pack(number, status, digest))


class RemoteLanesHasher(DigestHasher):
    """The worker's side: digests computed by the supervisor's :class:`HashServer` at
    ``path``. ``concurrency`` is this worker's share of the engines' lanes (what its
    admission control counts on)."""

    def __init__(
        self,
        path: Path,
        cost: int,
        *,
        concurrency: int,
        odd_2a_verify: Callable[[str, str], bool] = bcrypt_verify,
    ) -> None:
        super().__init__(cost, odd_2a_verify=odd_2a_verify)
        self._path = path
        self.concurrency = concurrency
        self._numbers = itertools.count()
        self._pending: dict[int, asyncio.Future[tuple[int, bytes]]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._connecting = asyncio.Lock()

    async def connect(self) -> None:
        """Connect now (start-up: a missing supervisor fails the worker at once)."""
        await self._connection()

    async def _connection(self) -> asyncio.StreamWriter:
        writer = self._writer
        if writer is not None and not writer.is_closing():
            return writer  # every check but the first: no lock on the hot path
        async with self._connecting:
            if self._writer is None or self._writer.is_closing():
                try:
                    reader, writer = await asyncio.open_unix_connection(str(self._path))
                except OSError as error:
                    _log.warning("shared hashing engines unreachable", error=repr(error))
                    raise HashingUnavailable() from error
                self._writer = writer
                self._reader_task = asyncio.get_running_loop().create_task(
                    self._read(reader, writer), name="hash-answers"
                )
            return self._writer

    async def digest(self, key: bytes, salt: bytes, cost: int) -> bytes:
        if not 1 <= len(key) <= KEY_MAX_BYTES or len(salt) != SALT_BYTES or not 4 <= cost <= 31:
            raise ValueError("bcrypt needs a 1..72-byte key, a 16-byte salt and a cost of 4..31")
        writer = await self._connection()
        number = next(self._numbers) & 0xFFFFFFFF
        answer: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self._pending[number] = answer
        try:
            writer.write(_REQUEST.pack(number, cost, len(key), salt) + key)
            status, digest = await answer
        finally:
            self._pending.pop(number, None)
        if status == _OK:
            return digest
        if status == _REFUSED:
            raise ValueError("the hashing engines refused the key, salt or cost")
        raise HashingUnavailable()

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                number, status, digest = _ANSWER.unpack(await reader.readexactly(_ANSWER.size))
                answer = self._pending.get(number)
                if answer is not None and not answer.done():
                    answer.set_result((status, digest))
        except (asyncio.IncompleteReadError, ConnectionError) as error:
            if self._writer is writer:  # not closed by close()
                _log.warning("shared hashing engines went away", error=repr(error))
        finally:
            writer.close()
            for answer in self._pending.values():
                if not answer.done():
                    answer.set_exception(HashingUnavailable())

    async def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        task, self._reader_task = self._reader_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
