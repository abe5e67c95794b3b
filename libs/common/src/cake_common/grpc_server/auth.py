"""Bearer-token authentication of gRPC calls.

Envoy checks tokens at the edge, but internal callers reach the services directly, so
every service verifies again here and binds the caller to
:data:`~cake_common.auth_context.principal_var`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from contextvars import Token
from dataclasses import dataclass
from functools import cache, partial
from types import TracebackType
from typing import Any

from cake.access.v1 import access_pb2
from google.protobuf import descriptor_pool

from cake_common.auth_context import principal_var
from cake_common.errors import CakeError, PermissionDenied, Unauthenticated, Unavailable
from cake_common.grpc_server.call_scope import (
    CallScope,
    ScopedServerInterceptor,
    ServicerContext,
    metadata_value,
)
from cake_common.grpc_server.rich_status import abort_with_error
from cake_common.jwt import JwtVerifier, Principal
from cake_common.logging import get_logger

AUTHORIZATION_METADATA_KEY = "authorization"

# Probes and tooling must work without a token; these never carry user data.
ALWAYS_PUBLIC_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)

RevocationCheck = Callable[[Principal], Awaitable[bool]]
"""``is_revoked(principal)``: True if the token or its session was revoked before the token
expired (:meth:`cake_common.revocation.RevocationList.is_revoked`); raises if it cannot tell."""

_log = get_logger(__name__)


def _service_of(method: str) -> str:
    # "/cake.auth.v1.AuthService/Login" -> "cake.auth.v1.AuthService"
    return method.lstrip("/").partition("/")[0]


@dataclass(frozen=True, slots=True)
class MethodAccess:
    """Who may call one RPC: its ``(cake.access.v1.access)`` option, as declared in the
    contract. A method that declares none may be called by user and admin tokens only."""

    public: bool = False
    token_optional: bool = False
    roles: frozenset[str] = frozenset({"user", "admin"})
    scopes: frozenset[str] = frozenset()
    declared: bool = False

    def allows(self, principal: Principal) -> bool:
        if principal.role in self.roles:
            return True
        return principal.is_service and not self.scopes.isdisjoint(principal.scopes)

    def refusal(self, principal: Principal) -> PermissionDenied:
        """The error for a caller :meth:`allows` refused (admin-only RPCs keep the message
        they have always answered)."""
        if principal.is_service and self.scopes:
            return PermissionDenied(
                "Token lacks the scope this method needs: " + " or ".join(sorted(self.scopes)),
                reason="INSUFFICIENT_SCOPE",
            )
        if self.roles == {"admin"}:
            return PermissionDenied("Admin role required", reason="ADMIN_ROLE_REQUIRED")
        return PermissionDenied(
            f"The {principal.role} role may not call this method", reason="ROLE_NOT_ALLOWED"
        )


@cache
def method_access(method: str) -> MethodAccess:
    """The access rule of ``/package.Service/Method`` from the generated descriptors (the
    contracts' ``cake.access.v1.access`` option); the default rule if it declares none."""
    full_name = method.lstrip("/").replace("/", ".")
    try:
        descriptor = descriptor_pool.Default().FindMethodByName(full_name)
    except KeyError:
        return MethodAccess()
    options = descriptor.GetOptions()
    if not options.HasExtension(access_pb2.access):
        return MethodAccess()
    declared = options.Extensions[access_pb2.access]
    return MethodAccess(
        public=declared.public,
        token_optional=declared.token_optional,
        roles=frozenset(declared.roles),
        scopes=frozenset(declared.scopes),
        declared=True,
    )


class AuthInterceptor(ScopedServerInterceptor):
    """Requires a valid ``authorization: Bearer <jwt>`` on every non-public method, and a
    token the method's declared access allows (:func:`method_access`: roles, or a service
    account's scopes), else PERMISSION_DENIED.

    What each RPC allows is declared in its contract (``option (cake.access.v1.access)``);
    ``public_methods`` and ``optional_methods`` (full names, ``/cake.auth.v1.AuthService/
    Login``) add to that for servers of services without one (tests). Health and reflection
    are always public. A token-optional method accepts a call without the header, but a
    header that is present must hold a valid, unrevoked token. Failures abort with
    UNAUTHENTICATED and a short message.

    ``is_revoked`` consults the shared revocation list (Redis). If the check itself fails:

    - an **admin** token is refused with UNAVAILABLE (fail closed: no admin action runs on a
      token that may have been revoked);
    - a **user** (or **service**) token is accepted and a warning logged (fail open), so a
      Redis outage does not lock every customer out; the exposure is bounded by the
      access-token lifetime (15 minutes by default, 5 for service tokens) because refreshing
      checks the session in auth's database.
    """

    def __init__(
        self,
        verifier: JwtVerifier,
        *,
        public_methods: Iterable[str] = (),
        optional_methods: Iterable[str] = (),
        is_revoked: RevocationCheck | None = None,
    ) -> None:
        super().__init__()
        self._verifier = verifier
        self._public_methods = frozenset(public_methods)
        self._optional_methods = frozenset(optional_methods)
        self._is_revoked = is_revoked

    def scope_for(self, method: str) -> CallScope | None:
        if method in self._public_methods or _service_of(method) in ALWAYS_PUBLIC_SERVICES:
            return None
        access = method_access(method)
        if access.public:
            return None
        if method in self._optional_methods or access.token_optional:
            return self._optional_scope
        return partial(self._scope, access=access)

    def _optional_scope(self, request: Any, context: ServicerContext) -> _AuthScope:
        # Without the header, no check; a token-optional method does its own checks on what
        # the token may do.
        return _AuthScope(self, None, context, required=False)

    def _scope(
        self, _request: Any, context: ServicerContext, *, access: MethodAccess | None
    ) -> _AuthScope:
        return _AuthScope(self, access, context, required=True)

    async def authenticate(self, authorization: str | None) -> Principal:
        """The principal for an ``authorization`` header value; raises ``Unauthenticated``."""
        if authorization is None:
            raise Unauthenticated("Missing bearer token", reason="TOKEN_MISSING")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("Malformed authorization header", reason="TOKEN_MALFORMED")
        principal = await self._verifier.verify(token)
        if await self._revoked(principal):
            raise Unauthenticated("Token has been revoked", reason="TOKEN_REVOKED")
        return principal

    async def _revoked(self, principal: Principal) -> bool:
        if self._is_revoked is None:
            return False
        try:
            return await self._is_revoked(principal)
        except Exception as error:
            if principal.is_admin:
                _log.warning("token revocation check failed; refusing admin token")
                raise Unavailable(
                    "Cannot check the token right now, please try again",
                    reason="REVOCATION_CHECK_UNAVAILABLE",
                ) from error
            _log.debug("token revocation check failed; accepting user token", error=repr(error))
            return False


class _AuthScope:
    """One call's :class:`AuthInterceptor` scope (a class: see ``call_scope``'s docstring)."""

    __slots__ = ("_access", "_context", "_interceptor", "_required", "_token")

    def __init__(
        self,
        interceptor: AuthInterceptor,
        access: MethodAccess | None,
        context: ServicerContext,
        *,
        required: bool,
    ) -> None:
        self._interceptor = interceptor
        self._access = access
        self._context = context
        self._required = required
        self._token: Token[Principal | None] | None = None

    async def __aenter__(self) -> None:
        authorization = metadata_value(self._context, AUTHORIZATION_METADATA_KEY)
        if authorization is None and not self._required:
            return
        access = self._access
        try:
            principal = await self._interceptor.authenticate(authorization)
            if access is not None and not access.allows(principal):
                raise access.refusal(principal)
        except CakeError as error:
            await abort_with_error(self._context, error)
        self._token = principal_var.set(principal)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._token is not None:
            principal_var.reset(self._token)
