"""What ``/.well-known/openid-configuration`` says (OpenID Connect Discovery 1.0 and RFC 8414
authorization server metadata): where the keys and the token endpoint are, and what they
support. Built once from the settings and the contracts; no I/O."""

from __future__ import annotations

from dataclasses import dataclass

from cake.access.v1 import access_pb2
from cake.auth.v1 import auth_pb2
from cake_common.jwt import ALLOWED_ALGORITHM

from cake_auth.domain.service_accounts import CLIENT_CREDENTIALS

JWKS_PATH = "/.well-known/jwks.json"
TOKEN_PATH = "/oauth/token"  # noqa: S105 (a path, not a secret)


def declared_scopes() -> tuple[str, ...]:
    """Every scope an RPC of the auth contract admits (``cake.access.v1.access``)."""
    scopes: set[str] = set()
    for service in auth_pb2.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            scopes.update(method.GetOptions().Extensions[access_pb2.access].scopes)
    return tuple(sorted(scopes))


@dataclass(frozen=True, slots=True)
class OpenIdConfiguration:
    issuer: str
    jwks_uri: str
    token_endpoint: str
    grant_types_supported: tuple[str, ...] = (CLIENT_CREDENTIALS,)
    token_endpoint_auth_methods_supported: tuple[str, ...] = (
        "client_secret_basic",
        "client_secret_post",
    )
    # No authorization endpoint: users log in with POST /auth/login, services with the
    # client credentials grant.
    response_types_supported: tuple[str, ...] = ()
    subject_types_supported: tuple[str, ...] = ("public",)
    id_token_signing_alg_values_supported: tuple[str, ...] = (ALLOWED_ALGORITHM,)
    scopes_supported: tuple[str, ...] = ()
    claims_supported: tuple[str, ...] = (
        "sub",
        "role",
        "scope",
        "client_id",
        "iss",
        "aud",
        "iat",
        "exp",
        "jti",
        "sid",
    )

    @classmethod
    def for_gateway(cls, *, issuer: str, public_url: str) -> OpenIdConfiguration:
        """The document for clients that reach Cake at ``public_url`` (the gateway)."""
        base = public_url.rstrip("/")
        return cls(
            issuer=issuer,
            jwks_uri=base + JWKS_PATH,
            token_endpoint=base + TOKEN_PATH,
            scopes_supported=declared_scopes(),
        )
