"""bcrypt password hashing off the event loop.

A check at cost 10 takes ~50 ms of CPU, so it must not run on the event loop. Two
implementations, both producing and accepting ``$2b$`` hashes (existing Cake users' hashes):

- :class:`BcryptThreadPoolHasher` (default): pyca ``bcrypt`` releases the GIL while hashing,
  so a thread per core uses every core.
- :class:`LibxcryptProcessPoolHasher`: glibc/libxcrypt ``crypt_r`` through the stdlib
  ``crypt`` module is ~12 % faster but holds the GIL, so it runs in worker processes.
"""

from __future__ import annotations

import asyncio
import hmac
import multiprocessing
import os
import time
import warnings
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from types import ModuleType
from typing import Literal

import bcrypt

from cake_auth.service.ports import PasswordHasher

HasherKind = Literal["bcrypt", "libxcrypt"]

_BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
_BCRYPT_MAX_BYTES = 72


def _bcrypt_hash(password: str, cost: int) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=cost)).decode()


def _bcrypt_verify(password: str, password_hash: str) -> bool:
    try:
        return bcrypt.checkpw(password.encode(), password_hash.encode())
    except ValueError:
        # Malformed hash or over-long password: neither can match.
        return False


def _crypt_module() -> ModuleType:
    # Deprecated since 3.11 (removed in 3.13): chosen on purpose, see the module docstring.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt
    return crypt


def _fits_crypt(password: str) -> bool:
    return "\x00" not in password and len(password.encode()) <= _BCRYPT_MAX_BYTES


def _libxcrypt_hash(password: str, cost: int) -> str:
    if not _fits_crypt(password):
        raise ValueError("password has NUL characters or is longer than 72 bytes")
    crypt = _crypt_module()
    hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=1 << cost))
    if hashed is None or not hashed.startswith("$2b$"):
        raise RuntimeError("libxcrypt did not produce a bcrypt hash")
    result: str = hashed
    return result


def _libxcrypt_verify(password: str, password_hash: str) -> bool:
    # crypt() would happily use a non-bcrypt "salt" (e.g. DES), fail on NUL and silently
    # truncate after 72 bytes: answer like pyca bcrypt instead, which refuses all three.
    if not password_hash.startswith(_BCRYPT_PREFIXES) or not _fits_crypt(password):
        return False
    hashed = _crypt_module().crypt(password, password_hash)
    return hashed is not None and hmac.compare_digest(hashed, password_hash)


def _warm_up_worker() -> None:
    _crypt_module()
    # Long enough that concurrent warm-up jobs land on different (new) workers.
    time.sleep(0.05)


class _ExecutorHasher:
    def __init__(self, executor: Executor, cost: int, *, libxcrypt: bool) -> None:
        self._executor = executor
        self._cost = cost
        self._hash = _libxcrypt_hash if libxcrypt else _bcrypt_hash
        self._verify = _libxcrypt_verify if libxcrypt else _bcrypt_verify

    async def hash(self, password: str) -> str:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._hash, password, self._cost)

    async def verify(self, password: str, password_hash: str) -> bool:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._verify, password, password_hash)

    async def close(self) -> None:
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)


class BcryptThreadPoolHasher(_ExecutorHasher):
    """pyca ``bcrypt`` in a thread pool (it releases the GIL while hashing)."""

    def __init__(self, cost: int, workers: int) -> None:
        super().__init__(
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bcrypt"),
            cost,
            libxcrypt=False,
        )


class LibxcryptProcessPoolHasher(_ExecutorHasher):
    """stdlib ``crypt`` (libxcrypt) in a process pool (it holds the GIL while hashing)."""

    def __init__(self, cost: int, workers: int) -> None:
        # spawn, not fork: forking a process that runs gRPC threads is unsafe.
        self._process_pool = ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn")
        )
        self._workers = workers
        super().__init__(self._process_pool, cost, libxcrypt=True)

    async def start(self) -> None:
        """Start every worker now, so the first logins do not pay for process start-up."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(
                loop.run_in_executor(self._process_pool, _warm_up_worker)
                for _ in range(self._workers)
            )
        )


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


async def open_password_hasher(
    kind: HasherKind, *, cost: int, workers: int | None = None
) -> PasswordHasher:
    """A started hasher of ``kind`` with ``workers`` threads/processes (default: CPU count)."""
    count = workers or available_cpus()
    if kind == "libxcrypt":
        hasher = LibxcryptProcessPoolHasher(cost, count)
        await hasher.start()
        return hasher
    return BcryptThreadPoolHasher(cost, count)
