"""bcrypt password hashing off the event loop.

A check at cost 10 takes ~50 ms of CPU, so it must not run on the event loop. Three
implementations, all producing ``$2b$`` hashes and accepting ``$2a$``/``$2b$``/``$2y$`` ones
(existing Cake users' hashes):

- :class:`LanesHasher` (default): :mod:`cake_bcrypt` engines, one thread each, every thread
  hashing up to ``lanes`` passwords at once (interleaved: one bcrypt leaves most of a core
  idle, four cost about 1.3 times one). Alone, a check costs what libxcrypt's does; under load
  a core checks about three times as many passwords a second. A ``$2a$`` hash with a
  non-ASCII password is checked by libxcrypt (or pyca bcrypt without it), as before: the two
  disagree on some of those, and existing hashes keep the answer they had.
- :class:`LibxcryptThreadPoolHasher`: libxcrypt's ``crypt_rn`` (Debian's ``libcrypt1``,
  ``libcrypt.so.1``) called through :mod:`ctypes`, ~15-20 % faster than pyca bcrypt. ctypes
  releases the GIL for the call and ``crypt_rn`` is reentrant (it works in a caller-owned
  ``struct crypt_data``), so a thread per core uses every core. No ``crypt`` import: the
  stdlib module is deprecated and gone in Python 3.13; ctypes is not.
- :class:`BcryptThreadPoolHasher`: pyca ``bcrypt`` (it releases the GIL too), the
  fallback where ``libcrypt.so.1`` cannot be loaded.

``open_password_hasher`` logs which one it opened; falling back from libxcrypt to pyca bcrypt
is a configured choice (``fallback``), logged as a warning, never silent.
"""

from __future__ import annotations

import abc
import asyncio
import ctypes
import hmac
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import bcrypt
from cake_bcrypt import (
    BcryptEngine,
    EngineClosedError,
    Setting,
    bcrypt_key,
    encode_hash,
    parse_hash,
)
from cake_common.logging import get_logger

from cake_auth.adapters.hash_pairing import PairingPolicy

HasherKind = Literal["lanes", "bcrypt", "libxcrypt"]
FallbackKind = Literal["bcrypt", "none"]

LIBCRYPT_SONAME = "libcrypt.so.1"
_BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
_BCRYPT_MAX_BYTES = 72
_BCRYPT_SALT_BYTES = 16
# sizeof(struct crypt_data) in <crypt.h>: libxcrypt's documented, fixed ABI size (32 KiB).
_CRYPT_DATA_SIZE = 32768
_CRYPT_OUTPUT_SIZE = 384  # CRYPT_OUTPUT_SIZE in <crypt.h>

_log = get_logger(__name__)


class LibcryptUnavailableError(RuntimeError):
    """``libcrypt.so.1`` (libxcrypt) cannot be loaded or lacks ``crypt_rn``."""


def _fits_bcrypt(password: str) -> bool:
    return "\x00" not in password and len(password.encode()) <= _BCRYPT_MAX_BYTES


def _bcrypt_hash(password: str, cost: int) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=cost)).decode()


def bcrypt_verify(password: str, password_hash: str) -> bool:
    try:
        return bcrypt.checkpw(password.encode(), password_hash.encode())
    except ValueError:
        # Malformed hash or over-long password: neither can match.
        return False


class Libxcrypt:
    """The two libxcrypt calls Cake needs, bound through ctypes (``CDLL``: GIL released)."""

    def __init__(self, soname: str = LIBCRYPT_SONAME) -> None:
        try:
            library = ctypes.CDLL(soname)
            crypt_rn = library.crypt_rn
            gensalt_rn = library.crypt_gensalt_rn
        except (OSError, AttributeError) as error:
            raise LibcryptUnavailableError(f"{soname}: {error}") from error
        # char *crypt_rn(const char *phrase, const char *setting, void *data, int size)
        crypt_rn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
        crypt_rn.restype = ctypes.c_char_p
        # char *crypt_gensalt_rn(const char *prefix, unsigned long count,
        #                        const char *rbytes, int nrbytes, char *output, int output_size)
        gensalt_rn.argtypes = [
            ctypes.c_char_p,
            ctypes.c_ulong,
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_int,
        ]
        gensalt_rn.restype = ctypes.c_char_p
        self._crypt_rn = crypt_rn
        self._gensalt_rn = gensalt_rn
        # One 32 KiB work area per thread, allocated (zeroed) on the thread's first call.
        self._local = threading.local()

    def _data(self) -> ctypes.Array[ctypes.c_char]:
        data: ctypes.Array[ctypes.c_char] | None = getattr(self._local, "data", None)
        if data is None:
            data = ctypes.create_string_buffer(_CRYPT_DATA_SIZE)
            self._local.data = data
        return data

    def crypt(self, password: str, setting: str) -> str | None:
        """``crypt_rn``; ``None`` when libxcrypt refuses the setting."""
        data = self._data()
        result: bytes | None = self._crypt_rn(
            password.encode(), setting.encode(), data, _CRYPT_DATA_SIZE
        )
        return None if result is None else result.decode("ascii", errors="replace")

    def bcrypt_setting(self, cost: int) -> str:
        """A fresh ``$2b$`` setting (cost and 16 random salt bytes from the OS)."""
        output = ctypes.create_string_buffer(_CRYPT_OUTPUT_SIZE)
        salt = os.urandom(_BCRYPT_SALT_BYTES)
        setting: bytes | None = self._gensalt_rn(
            b"$2b$", cost, salt, len(salt), output, _CRYPT_OUTPUT_SIZE
        )
        if setting is None:
            raise ValueError(f"libxcrypt refused bcrypt cost {cost}")
        return setting.decode("ascii")

    def hash(self, password: str, cost: int) -> str:
        if not _fits_bcrypt(password):
            raise ValueError("password has NUL characters or is longer than 72 bytes")
        hashed = self.crypt(password, self.bcrypt_setting(cost))
        if hashed is None or not hashed.startswith("$2b$"):
            raise RuntimeError("libxcrypt did not produce a bcrypt hash")
        return hashed

    def verify(self, password: str, password_hash: str) -> bool:
        # crypt_rn would happily use a non-bcrypt "salt" (e.g. DES) and silently truncate
        # after 72 bytes (and ctypes would cut at a NUL): answer like pyca bcrypt instead,
        # which refuses all three.
        if not password_hash.startswith(_BCRYPT_PREFIXES) or not _fits_bcrypt(password):
            return False
        hashed = self.crypt(password, password_hash)
        return hashed is not None and hmac.compare_digest(hashed, password_hash)


class ThreadPoolHasher(abc.ABC):
    """A :class:`~cake_auth.service.ports.PasswordHasher` running checks on ``workers``
    threads; a subclass gives the blocking hash and check."""

    kind: HasherKind

    def __init__(self, cost: int, workers: int) -> None:
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bcrypt")
        self._cost = cost
        self.workers = workers
        # Hashes computed at once: one per thread.
        self.concurrency = workers

    @abc.abstractmethod
    def _hash(self, password: str, cost: int) -> str: ...

    @abc.abstractmethod
    def _verify(self, password: str, password_hash: str) -> bool: ...

    async def hash(self, password: str) -> str:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._hash, password, self._cost)

    async def verify(self, password: str, password_hash: str) -> bool:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._verify, password, password_hash)

    async def close(self) -> None:
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)


class LibxcryptThreadPoolHasher(ThreadPoolHasher):
    """libxcrypt's ``crypt_rn`` through ctypes in a thread pool (the GIL is released)."""

    kind: HasherKind = "libxcrypt"

    def __init__(self, cost: int, workers: int, library: Libxcrypt | None = None) -> None:
        self._library = library or Libxcrypt()
        super().__init__(cost, workers)

    def _hash(self, password: str, cost: int) -> str:
        return self._library.hash(password, cost)

    def _verify(self, password: str, password_hash: str) -> bool:
        return self._library.verify(password, password_hash)


class BcryptThreadPoolHasher(ThreadPoolHasher):
    """pyca ``bcrypt`` in a thread pool (it releases the GIL while hashing)."""

    kind: HasherKind = "bcrypt"

    def _hash(self, password: str, cost: int) -> str:
        return _bcrypt_hash(password, cost)

    def _verify(self, password: str, password_hash: str) -> bool:
        return bcrypt_verify(password, password_hash)


class DigestHasher(abc.ABC):
    """A :class:`~cake_auth.service.ports.PasswordHasher` over a source of raw bcrypt digests
    (:meth:`digest`): the hash strings, the checks and what pyca bcrypt refuses are here."""

    kind: HasherKind = "lanes"
    concurrency: int

    def __init__(
        self, cost: int, *, odd_2a_verify: Callable[[str, str], bool] = bcrypt_verify
    ) -> None:
        self._cost = cost
        self._odd_2a_verify = odd_2a_verify

    @abc.abstractmethod
    async def digest(self, key: bytes, salt: bytes, cost: int) -> bytes:
        """bcrypt(cost, salt, key): 23 bytes (``key`` from :func:`cake_bcrypt.bcrypt_key`)."""

    async def _digest(self, password: str, setting: Setting) -> bytes:
        return await self.digest(bcrypt_key(password.encode()), setting.salt, setting.cost)

    async def hash(self, password: str) -> str:
        if not _fits_bcrypt(password):
            raise ValueError("password has NUL characters or is longer than 72 bytes")
        setting = Setting("$2b$", self._cost, os.urandom(_BCRYPT_SALT_BYTES))
        return encode_hash(setting, await self._digest(password, setting))

    async def verify(self, password: str, password_hash: str) -> bool:
        # Like pyca bcrypt: a NUL or more than 72 bytes never match (no silent truncation).
        if not _fits_bcrypt(password):
            return False
        try:
            setting = parse_hash(password_hash)
        except ValueError:
            return False
        if setting.prefix == "$2a$" and not password.isascii():
            return await asyncio.to_thread(self._odd_2a_verify, password, password_hash)
        computed = encode_hash(setting, await self._digest(password, setting))
        return hmac.compare_digest(computed.encode(), password_hash.encode())

    @abc.abstractmethod
    async def close(self) -> None: ...


@dataclass(slots=True)
class _Held:
    """A hash waiting for a partner: its job, and the future of (engine, its digest)."""

    key: bytes
    salt: bytes
    cost: int
    ready: asyncio.Future[tuple[int, Future[bytes]]]
    timer: asyncio.TimerHandle | None = None


class LanesHasher(DigestHasher):
    """bcrypt on ``workers`` :class:`cake_bcrypt.BcryptEngine` threads of ``lanes`` lanes each.

    Which engine a hash goes to, and whether a lone one first waits up to
    ``partner_wait_seconds`` for a partner, is :class:`~cake_auth.adapters.hash_pairing.
    PairingPolicy`'s choice (counted on the event loop): a hash joins an engine running exactly
    one, else the least loaded; one that would run alone on an idle engine waits for the next
    while arrivals say it is due within the wait (0: never waits).
    """

    def __init__(
        self,
        cost: int,
        workers: int,
        lanes: int,
        *,
        odd_2a_verify: Callable[[str, str], bool] = bcrypt_verify,
        rounds_per_step: int = 64,
        partner_wait_seconds: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(cost, odd_2a_verify=odd_2a_verify)
        self._engines = [
            BcryptEngine(lanes=lanes, rounds_per_step=rounds_per_step, name=f"bcrypt-{index}")
            for index in range(workers)
        ]
        self._policy = PairingPolicy(workers, lanes, max_wait_seconds=partner_wait_seconds)
        self._clock = clock
        self._held: _Held | None = None
        self.workers = workers
        self.lanes = lanes
        # Hashes computed at once: every lane of every engine.
        self.concurrency = workers * lanes
        #: Hashes that waited for a partner: found one / went alone after the wait.
        self.partner_waits = {"paired": 0, "alone": 0}

    def in_flight(self, engine: int) -> int:
        """Hashes submitted to ``engine`` and not finished."""
        return self._policy.in_flight(engine)

    async def digest(self, key: bytes, salt: bytes, cost: int) -> bytes:
        self._policy.arrived(self._clock())
        held, self._held = self._held, None
        if held is not None and not held.ready.done():
            # A lone hash is waiting: both start now, on one engine.
            if held.timer is not None:
                held.timer.cancel()
            engine = self._policy.least_loaded()
            self._start_held(held, engine)
            self.partner_waits["paired"] += 1
        else:
            placed = self._policy.place().engine
            if placed is None:
                return await self._wait_for_partner(key, salt, cost)
            engine = placed
        return await self._finish(engine, self._submit(engine, key, salt, cost))

    def _start_held(self, held: _Held, engine: int) -> None:
        """Submit the waiting hash to ``engine``; its waiter gets the future, or the error
        (a closed engine) instead of waiting forever."""
        try:
            held.ready.set_result((engine, self._submit(engine, held.key, held.salt, held.cost)))
        except EngineClosedError as error:
            held.ready.set_exception(error)

    def _submit(self, engine: int, key: bytes, salt: bytes, cost: int) -> Future[bytes]:
        future = self._engines[engine].submit(key, salt, cost)
        self._policy.submitted(engine)
        return future

    async def _finish(self, engine: int, future: Future[bytes]) -> bytes:
        try:
            return await asyncio.wrap_future(future)
        finally:
            self._policy.finished(engine)

    async def _wait_for_partner(self, key: bytes, salt: bytes, cost: int) -> bytes:
        loop = asyncio.get_running_loop()
        held = _Held(key, salt, cost, loop.create_future())

        def alone() -> None:
            if self._held is held and not held.ready.done():
                self._held = None
                self._start_held(held, self._policy.least_loaded())
                self.partner_waits["alone"] += 1

        held.timer = loop.call_later(self._policy.max_wait_seconds, alone)
        self._held = held
        try:
            engine, future = await held.ready
        except asyncio.CancelledError:
            # The caller went away: a hash not yet started is dropped.
            held.timer.cancel()
            if self._held is held:
                self._held = None
            if held.ready.done() and not held.ready.cancelled():
                engine, future = held.ready.result()
                future.cancel()
                self._policy.finished(engine)
            raise
        return await self._finish(engine, future)

    async def close(self) -> None:
        def close_all() -> None:
            for engine in self._engines:
                engine.close()

        await asyncio.to_thread(close_all)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def odd_2a_verifier(libcrypt_soname: str = LIBCRYPT_SONAME) -> Callable[[str, str], bool]:
    """Who checks a ``$2a$`` hash with a non-ASCII password: libxcrypt, else pyca bcrypt."""
    try:
        return Libxcrypt(libcrypt_soname).verify
    except LibcryptUnavailableError:
        return bcrypt_verify


async def open_password_hasher(
    kind: HasherKind,
    *,
    cost: int,
    workers: int | None = None,
    lanes: int = 4,
    fallback: FallbackKind = "bcrypt",
    libcrypt_soname: str = LIBCRYPT_SONAME,
    partner_wait_seconds: float = 0.0,
) -> ThreadPoolHasher | LanesHasher:
    """A hasher of ``kind`` with ``workers`` threads (default: CPU count); each thread of the
    lanes hasher computes up to ``lanes`` hashes at once, and a lone hash waits up to
    ``partner_wait_seconds`` for a partner when one is due (:class:`LanesHasher`).

    When ``kind`` is libxcrypt and ``libcrypt_soname`` cannot be loaded, ``fallback``
    decides: ``bcrypt`` opens pyca bcrypt and logs a warning saying so; ``none`` raises
    :class:`LibcryptUnavailableError` (the service does not start).
    """
    count = workers or available_cpus()
    hasher: ThreadPoolHasher | LanesHasher
    if kind == "lanes":
        hasher = LanesHasher(
            cost,
            count,
            lanes,
            odd_2a_verify=odd_2a_verifier(libcrypt_soname),
            partner_wait_seconds=partner_wait_seconds,
        )
    elif kind == "libxcrypt":
        try:
            hasher = LibxcryptThreadPoolHasher(cost, count, Libxcrypt(libcrypt_soname))
        except LibcryptUnavailableError as error:
            if fallback == "none":
                raise LibcryptUnavailableError(
                    f"{error}; install Debian's libcrypt1, or set "
                    "CAKE_AUTH_PASSWORD_HASHER_FALLBACK=bcrypt (or "
                    "CAKE_AUTH_PASSWORD_HASHER=bcrypt) to use pyca bcrypt"
                ) from error
            _log.warning(
                "libxcrypt unavailable, hashing with pyca bcrypt instead",
                reason=str(error),
                configured_hasher=kind,
                hasher_fallback=fallback,
            )
            hasher = BcryptThreadPoolHasher(cost, count)
    else:
        hasher = BcryptThreadPoolHasher(cost, count)
    _log.info(
        "bcrypt hasher ready",
        hasher=hasher.kind,
        workers=count,
        concurrency=hasher.concurrency,
        cost=cost,
        partner_wait_ms=round(partner_wait_seconds * 1000) if kind == "lanes" else None,
    )
    return hasher
