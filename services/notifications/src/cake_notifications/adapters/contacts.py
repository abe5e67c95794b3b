"""Users' contacts from auth over gRPC, cached a while, asked for together.

The lookups asked for in the same turn of the event loop (a consumer batch's users) go in
ONE ``AuthService.GetUsersContacts`` call (at most :data:`BATCH_LIMIT` users each): one call
per user was, under load, the slowest step between a voucher and its e-mail
(bench/notifications.py). An auth that does not know that RPC yet (UNIMPLEMENTED, during a
rolling deployment) is asked one user at a time (``GetUserContacts``).

The call carries a service token (role ``service``, scope ``users:read-contacts``) from a
:data:`TokenSource`; the composition root picks the source: the service account's client
credentials (``cake_client.ClientCredentials``, tokens requested from auth and renewed
before they expire; tests pass their own). The cache is a small hand-written TTL map: one
dict and a clock, not worth a dependency.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

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


BATCH_LIMIT = 500
"""Users per ``GetUsersContacts`` call (the contract's limit)."""


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
        self._queued: dict[int, asyncio.Future[Contacts | None]] = {}
        """Lookups waiting for the next call (hand-written batching: a dict of futures and
        one ``call_soon``, not worth a dependency)."""
        self._batch_supported = True
        self._calls: set[asyncio.Task[None]] = set()

    async def contacts(self, user_id: int) -> Contacts | None:
        cached = self._cache.get(user_id)
        if cached is not None and cached[0] > self._clock():
            return cached[1]
        waiting = self._queued.get(user_id)
        if waiting is None:
            if not self._queued:
                asyncio.get_running_loop().call_soon(self._send_queued)
            waiting = self._queued[user_id] = asyncio.get_running_loop().create_future()
        return await asyncio.shield(waiting)

    def _send_queued(self) -> None:
        queued, self._queued = self._queued, {}
        users = list(queued)
        for start in range(0, len(users), BATCH_LIMIT):
            chunk = {user: queued[user] for user in users[start : start + BATCH_LIMIT]}
            task = asyncio.create_task(self._answer(chunk))
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)

    async def _answer(self, waiting: dict[int, asyncio.Future[Contacts | None]]) -> None:
        try:
            found = await self._fetch_many(list(waiting))
        except asyncio.CancelledError:
            for future in waiting.values():
                future.cancel()
            raise
        except Exception as error:
            for future in waiting.values():
                if not future.done():
                    future.set_exception(error)
                    future.exception()  # retrieved: its callers may have gone
            return
        expires = self._clock() + self._ttl
        if len(self._cache) + len(waiting) > self._max_entries:
            self._cache.clear()  # crude but bounded: a cold cache only costs lookups
        for user_id, future in waiting.items():
            contacts = found.get(user_id)
            self._cache[user_id] = (expires, contacts)
            if not future.done():
                future.set_result(contacts)

    async def _fetch_many(self, user_ids: Sequence[int]) -> dict[int, Contacts | None]:
        if self._batch_supported:
            try:
                return await self._fetch_batch(user_ids)
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise self._failure(error) from error
                self._batch_supported = False  # an older auth: one user per call
        found = await asyncio.gather(*(self._fetch(user_id) for user_id in user_ids))
        return dict(zip(user_ids, found, strict=True))

    async def _fetch_batch(self, user_ids: Sequence[int]) -> dict[int, Contacts | None]:
        try:
            token = await self._token(self._stub)
        except OSError as error:
            raise TransientSendError(f"token source: {error!r}") from error
        response = await self._stub.GetUsersContacts(
            oauth_pb2.GetUsersContactsRequest(user_ids=list(user_ids)),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=self._deadline,
        )
        found: dict[int, Contacts | None] = dict.fromkeys(user_ids)
        for item in response.contacts:
            found[item.user_id] = Contacts(
                user_id=item.user_id, email=item.email, phone=item.phone, fullname=item.fullname
            )
        return found

    def _failure(self, error: grpc.aio.AioRpcError) -> Exception:
        """What a failed call to auth means for the dispatcher: ``TransientSendError`` (try
        again later) or, for anything else, a ``RuntimeError`` saying which call failed."""
        if error.code() == grpc.StatusCode.UNAUTHENTICATED:
            self._on_refused()  # e.g. a rotated secret revoked it: get another
        if error.code() in _TRANSIENT:
            return TransientSendError(f"auth directory: {error.code().name} {error.details()}")
        return RuntimeError(f"auth directory refused: {error.code().name} {error.details()}")

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
            raise self._failure(error) from error
        except OSError as error:
            raise TransientSendError(f"token source: {error!r}") from error
        return Contacts(
            user_id=response.user_id,
            email=response.email,
            phone=response.phone,
            fullname=response.fullname,
        )

    async def close(self) -> None:
        for task in [*self._calls]:
            task.cancel()
        await self._channel.close(None)
