"""Users' contacts from auth's ``UserDirectoryService`` over gRPC, cached for a while.

The call carries a service token (role ``service``, scope ``users:read-contacts``) from a
:data:`TokenSource`; the composition root picks the source (a token file today; the
client-credentials provider once auth issues service tokens). The cache is a small
hand-written TTL map: one dict and a clock, not worth a dependency.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from cake.auth.v1 import directory_pb2, directory_pb2_grpc

from cake_notifications.domain.notifications import parse_language
from cake_notifications.service.ports import Contacts, TransientSendError

TokenSource = Callable[[], Awaitable[str]]
"""Returns a bearer token for auth (fresh enough to be accepted)."""

_TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAUTHENTICATED,  # an expired token: the next attempt gets a new one
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)


def token_file_source(path: Path) -> TokenSource:
    """A token read from ``path`` at each call (a mounted secret that may be rotated)."""

    async def token() -> str:
        # A few bytes from a local (often tmpfs) file: not worth a thread hop.
        return path.read_text().strip()  # noqa: ASYNC240

    return token


class GrpcContactDirectory:
    def __init__(
        self,
        target: str,
        token: TokenSource,
        *,
        ttl_seconds: float = 300.0,
        max_entries: int = 100_000,
        deadline_seconds: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = directory_pb2_grpc.UserDirectoryServiceStub(self._channel)
        self._token = token
        self._ttl = ttl_seconds
        self._max_entries = max_entries
        self._deadline = deadline_seconds
        self._clock = clock
        self._cache: dict[int, tuple[float, Contacts | None]] = {}

    async def contacts(self, user_id: int) -> Contacts | None:
        now = self._clock()
        cached = self._cache.get(user_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        found = await self._fetch(user_id)
        if len(self._cache) >= self._max_entries:
            self._cache.clear()  # crude but bounded: a cold cache only costs lookups
        self._cache[user_id] = (now + self._ttl, found)
        return found

    async def _fetch(self, user_id: int) -> Contacts | None:
        try:
            token = await self._token()
            response = await self._stub.GetUserContacts(
                directory_pb2.GetUserContactsRequest(user_id=user_id),
                metadata=(("authorization", f"Bearer {token}"),),
                timeout=self._deadline,
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return None
            if error.code() in _TRANSIENT:
                raise TransientSendError(
                    f"auth directory: {error.code().name} {error.details()}"
                ) from error
            raise
        except OSError as error:
            raise TransientSendError(f"token source: {error!r}") from error
        return Contacts(
            user_id=response.user_id,
            email=response.email,
            phone=response.phone,
            fullname=response.fullname,
            language=parse_language(response.preferred_language),
        )

    async def close(self) -> None:
        await self._channel.close(None)
