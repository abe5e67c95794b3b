"""bcrypt with several passwords per thread at once.

One bcrypt computation leaves most of a core idle (each Blowfish round waits for the loads of
the round before); :class:`BcryptEngine` runs up to ``lanes`` of them interleaved on its own
thread (the C extension ``cake_bcrypt._lanes``), each an ordinary bcrypt with the standard
result. A password submitted while others are being hashed joins them within a few
milliseconds (between two steps of ``rounds_per_step`` rounds); alone, it is hashed alone.

The hash strings (``$2b$``, ``$2a$``, ``$2y$``; cost 04..31; 22 characters of salt and 31 of
digest in bcrypt's base64) are read and written by :func:`parse_hash` and :func:`encode_hash`.
"""

from __future__ import annotations

import base64
import binascii
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Final

from cake_bcrypt._lanes import MAX_LANES, Lanes

__all__ = [
    "MAX_LANES",
    "BcryptEngine",
    "EngineClosedError",
    "Setting",
    "bcrypt_key",
    "encode_hash",
    "parse_hash",
]

KEY_MAX_BYTES: Final = 72
SALT_BYTES: Final = 16
PREFIXES: Final = ("$2a$", "$2b$", "$2y$")
_HASH_LENGTH: Final = 60  # "$2b$" + "10$" + 22 salt + 31 digest characters
# bcrypt's base64 is standard base64's bit packing with its own alphabet and no padding.
_BCRYPT_ALPHABET: Final = b"./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_STANDARD_ALPHABET: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_TO_BCRYPT: Final = bytes.maketrans(_STANDARD_ALPHABET, _BCRYPT_ALPHABET)
_FROM_BCRYPT: Final = bytes.maketrans(_BCRYPT_ALPHABET, _STANDARD_ALPHABET)


class EngineClosedError(RuntimeError):
    """The engine was closed (or its thread failed): it hashes nothing more."""


@dataclass(frozen=True, slots=True)
class Setting:
    """What a bcrypt hash string says besides its digest."""

    prefix: str
    cost: int
    salt: bytes


def bcrypt_key(password: bytes) -> bytes:
    """The key bytes bcrypt uses: the password and its terminating NUL, cut at 72 bytes."""
    if b"\x00" in password:
        raise ValueError("a bcrypt password cannot contain NUL bytes")
    return (password + b"\x00")[:KEY_MAX_BYTES]


def _encode64(data: bytes) -> str:
    return base64.b64encode(data).rstrip(b"=").translate(_TO_BCRYPT).decode("ascii")


def encode_hash(setting: Setting, digest: bytes) -> str:
    """The hash string of ``setting`` and the 23 digest bytes."""
    return f"{setting.prefix}{setting.cost:02d}${_encode64(setting.salt)}{_encode64(digest)}"


def parse_hash(password_hash: str) -> Setting:
    """The prefix, cost and salt of a bcrypt hash string; ``ValueError`` if it is not one."""
    prefix = password_hash[:4]
    if prefix not in PREFIXES or len(password_hash) != _HASH_LENGTH:
        raise ValueError("not a bcrypt hash ($2a$/$2b$/$2y$, 60 characters)")
    cost_text, separator = password_hash[4:6], password_hash[6]
    if not (cost_text.isascii() and cost_text.isdigit()) or separator != "$":
        raise ValueError("a bcrypt hash's cost is two digits followed by '$'")
    cost = int(cost_text)
    if not 4 <= cost <= 31:
        raise ValueError(f"bcrypt cost must be 04..31, not {cost_text}")
    salt_text = password_hash[7:29]
    try:
        salt = base64.b64decode(
            salt_text.encode("ascii").translate(_FROM_BCRYPT) + b"==", validate=True
        )
    except (UnicodeEncodeError, binascii.Error) as error:
        raise ValueError("a bcrypt hash's salt is 22 characters of bcrypt's base64") from error
    if not set(salt_text.encode("ascii")) <= set(_BCRYPT_ALPHABET) or len(salt) != SALT_BYTES:
        raise ValueError("a bcrypt hash's salt is 22 characters of bcrypt's base64")
    return Setting(prefix, cost, salt)


_Job = tuple["Future[bytes]", bytes, bytes, int]


class BcryptEngine:
    """A thread computing up to ``lanes`` bcrypt digests at once.

    :meth:`submit` hands it a computation and returns a :class:`~concurrent.futures.Future`
    of the 23 digest bytes. Computations start in submission order as lanes free up; a
    cancelled future that has not started is skipped. :meth:`close` lets everything submitted
    finish, then stops the thread.
    """

    def __init__(self, *, lanes: int = 4, rounds_per_step: int = 64, name: str = "bcrypt") -> None:
        if rounds_per_step < 1:
            raise ValueError("rounds_per_step must be >= 1")
        self._lanes = Lanes(lanes)
        self.lanes = lanes
        self._rounds_per_step = rounds_per_step
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, key: bytes, salt: bytes, cost: int) -> Future[bytes]:
        """Compute bcrypt(cost, salt, key): ``key`` from :func:`bcrypt_key`."""
        if not 1 <= len(key) <= KEY_MAX_BYTES or len(salt) != SALT_BYTES or not 4 <= cost <= 31:
            raise ValueError("bcrypt needs a 1..72-byte key, a 16-byte salt and a cost of 4..31")
        future: Future[bytes] = Future()
        with self._lock:
            if self._closed:
                raise EngineClosedError("the bcrypt engine is closed") from self._failure
            self._queue.put((future, key, salt, cost))
        return future

    def close(self, timeout: float | None = None) -> None:
        """Finish what was submitted, then stop the thread (waits up to ``timeout``)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(None)
        self._thread.join(timeout)

    def _work(self) -> None:
        running: dict[int, Future[bytes]] = {}
        try:
            self._serve(running)
        except BaseException as error:  # a bug: fail every caller rather than leave them waiting
            with self._lock:
                self._closed = True
                self._failure = error
            failure = EngineClosedError(f"the bcrypt engine failed: {error!r}")
            for future in running.values():
                future.set_exception(failure)
            while True:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is not None and job[0].set_running_or_notify_cancel():
                    job[0].set_exception(failure)
            raise

    def _serve(self, running: dict[int, Future[bytes]]) -> None:
        free = list(range(self.lanes))
        closing = False
        while True:
            # Start what is waiting in the free lanes; block only when nothing is running.
            while free and not closing:
                try:
                    job = self._queue.get(block=not running)
                except queue.Empty:
                    break
                if job is None:
                    closing = True
                    break
                future, key, salt, cost = job
                if not future.set_running_or_notify_cancel():
                    continue  # cancelled while it waited
                slot = free.pop()
                running[slot] = future  # first: a failing start fails this caller too
                self._lanes.start(slot, key, salt, cost)
            if not running:
                if closing:
                    return
                continue
            for slot in self._lanes.run(self._rounds_per_step):
                digest = self._lanes.take(slot)
                free.append(slot)
                running.pop(slot).set_result(digest)
