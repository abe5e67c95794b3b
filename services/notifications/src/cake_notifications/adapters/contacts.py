"""Users' contacts from auth (``AuthService.GetUserContacts``) over gRPC, cached a while.

The call carries a service token (role ``service``, scope ``users:read-contacts``) from a
:data:`TokenSource`; the composition root picks the source: the service account's client
credentials (``cake_client.ClientCredentials``, tokens requested from auth and renewed
before they expire; tests pass their own). The cache is a small hand-written TTL map: one
dict and a clock, not worth a dependency.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import grpc
from cake.auth.v1 import auth_pb2_grpc, oauth_pb2
from cake_client import ClientCredentials

from cake_notifications.service.ports import Contacts, TransientSendError

TokenSource = Callable[["auth_pb2_grpc.AuthServiceAsyncStub"], Awaitable[str]]
"""Returns a bearer token for auth (fresh enough to be accepted), given auth's stub (the
client-credentials source asks it for one)."""

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


def client_credentials_source(credentials: ClientCredentials) -> TokenSource:
    """Tokens of a service account (OAuth 2.0 client credentials grant)."""
    return credentials.token


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
        on_refused: Callable[[], None] | None = None,
    ) -> None:
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = auth_pb2_grpc.AuthServiceStub(self._channel)
        self._token = token
        self._on_refused: Callable[[], None] = on_refused or (lambda: None)
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
            token = await self._token(self._stub)
            response = await self._stub.GetUserContacts(
                oauth_pb2.GetUserContactsRequest(user_id=user_id),
                metadata=(("authorization", f"Bearer {token}"),),
                timeout=self._deadline,
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return None
            if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                self._on_refused()  # e.g. a rotated secret revoked it: get another
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
        )

    async def close(self) -> None:
        await self._channel.close(None)
