"""Where a call's bearer token comes from.

``StaticToken`` for a token obtained elsewhere; ``PasswordSession`` for a user account: it logs
in on first use, rotates its refresh token shortly before the access token expires, and logs
in again when the session has ended (logged out, revoked, reused refresh token, too old);
``ClientCredentials`` for a service account: it requests a short-lived token with the OAuth
2.0 client credentials grant and requests another shortly before that one expires.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
from cake.auth.v1 import auth_pb2, auth_pb2_grpc, oauth_pb2


class TokenProvider(Protocol):
    """Gives the access token for the next call; may call AuthService on ``auth``."""

    async def token(self, auth: auth_pb2_grpc.AuthServiceAsyncStub) -> str: ...


@dataclass(frozen=True)
class StaticToken:
    """A token the caller already has (it is sent as is; renewing it is the caller's job)."""

    value: str

    async def token(self, auth: auth_pb2_grpc.AuthServiceAsyncStub) -> str:
        return self.value


class PasswordSession:
    """A user session kept alive for the client: login, then refresh-token rotation.

    One lock around renewals: many concurrent calls at expiry make one refresh, not one each
    (a second use of a rotated refresh token would end the whole session by design)."""

    def __init__(
        self,
        account: str,
        password: str,
        *,
        renew_before_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not account or not password:
            raise ValueError("account and password must not be empty")
        self._account = account
        self._password = password
        self._renew_before = renew_before_seconds
        self._clock = clock
        self._lock = asyncio.Lock()
        self._access: str | None = None
        self._refresh: str | None = None
        self._expires_at = 0.0
        #: How many times this session logged in and refreshed (for logs and tests).
        self.logins = 0
        self.refreshes = 0

    async def token(self, auth: auth_pb2_grpc.AuthServiceAsyncStub) -> str:
        if self._fresh():
            assert self._access is not None
            return self._access
        async with self._lock:
            if not self._fresh():
                await self._renew(auth)
            assert self._access is not None
            return self._access

    def _fresh(self) -> bool:
        return self._access is not None and self._clock() < self._expires_at - self._renew_before

    def forget(self) -> None:
        """Drop the tokens (after the server refused them): the next call renews."""
        self._access = None
        self._expires_at = 0.0

    async def _renew(self, auth: auth_pb2_grpc.AuthServiceAsyncStub) -> None:
        now = self._clock()
        if self._refresh is not None:
            try:
                refreshed = await auth.RefreshToken(
                    auth_pb2.RefreshTokenRequest(refresh_token=self._refresh)
                )
            except grpc.aio.AioRpcError as error:
                if error.code() is not grpc.StatusCode.UNAUTHENTICATED:
                    raise
                # The session ended on the server: start a new one below.
            else:
                self.refreshes += 1
                self._store(
                    refreshed.access_token, refreshed.refresh_token, refreshed.expires_in, now
                )
                return
        logged_in = await auth.Login(
            auth_pb2.LoginRequest(account=self._account, password=self._password)
        )
        self.logins += 1
        self._store(logged_in.access_token, logged_in.refresh_token, logged_in.expires_in, now)

    def _store(self, access: str, refresh: str, expires_in: int, now: float) -> None:
        self._access = access
        self._refresh = refresh or None
        self._expires_at = now + expires_in


class ClientCredentials:
    """A service account's tokens (OAuth 2.0 client credentials grant, ``AuthService.Token``):
    one token is requested on first use, kept while fresh and requested again
    ``renew_before_seconds`` before it expires (service tokens live minutes and cannot be
    refreshed). One lock around renewals: concurrent calls at expiry make one request.

    ``scopes`` narrows the token to those scopes (a subset of the account's); empty: all of
    them. The secret is sent in the request's fields, never in logs."""

    def __init__(
        self,
        client_id: str,
        client_secret: str,
        *,
        scopes: Sequence[str] = (),
        renew_before_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not client_id or not client_secret:
            raise ValueError("client_id and client_secret must not be empty")
        self._client_id = client_id
        self._client_secret = client_secret
        self._scope = " ".join(scopes)
        self._renew_before = renew_before_seconds
        self._clock = clock
        self._lock = asyncio.Lock()
        self._access: str | None = None
        self._expires_at = 0.0
        #: Tokens requested so far (for logs and tests).
        self.requests = 0
        #: The scopes the last token was granted.
        self.granted_scopes: frozenset[str] = frozenset()

    def _fresh(self) -> bool:
        return self._access is not None and self._clock() < self._expires_at - self._renew_before

    def forget(self) -> None:
        """Drop the token (after the server refused it): the next call requests another."""
        self._access = None
        self._expires_at = 0.0

    async def token(self, auth: auth_pb2_grpc.AuthServiceAsyncStub) -> str:
        if self._fresh():
            assert self._access is not None
            return self._access
        async with self._lock:
            if not self._fresh():
                now = self._clock()
                issued = await auth.Token(
                    oauth_pb2.TokenRequest(
                        grant_type="client_credentials",
                        client_id=self._client_id,
                        client_secret=self._client_secret,
                        scope=self._scope,
                    )
                )
                self.requests += 1
                self._access = issued.access_token
                self._expires_at = now + issued.expires_in
                self.granted_scopes = frozenset(issued.scope.split())
            assert self._access is not None
            return self._access
