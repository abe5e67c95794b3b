"""Who is calling: the principal of the current gRPC call, set by the auth interceptor.

Use cases read it through :func:`current_principal` / :func:`require_admin` instead of
taking the transport's context, so they stay testable with a plain ``principal_var.set``.
"""

from __future__ import annotations

from contextvars import ContextVar

from cake_common.errors import PermissionDenied, Unauthenticated
from cake_common.jwt import Principal

principal_var: ContextVar[Principal | None] = ContextVar("cake_principal", default=None)


def current_principal() -> Principal:
    """The authenticated caller; ``Unauthenticated`` if the call carried no valid token."""
    principal = principal_var.get()
    if principal is None:
        raise Unauthenticated("Authentication required")
    return principal


def require_admin() -> Principal:
    """The authenticated caller if it has the ``admin`` role, else ``PermissionDenied``."""
    principal = current_principal()
    if not principal.is_admin:
        raise PermissionDenied("Admin role required", reason="ADMIN_ROLE_REQUIRED")
    return principal
