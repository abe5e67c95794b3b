"""The token check every service runs, built from its settings in one place.

Each service's composition root calls these so that the verifier (issuer, audience,
clock-skew leeway) and the revocation list (Redis namespace) are configured identically
everywhere::

    revocations = revocation_list(settings, redis_client)
    revocations.start()  # follow the revocation stream; stop it with `await aclose()`
    builder.with_auth(
        token_verifier(settings, settings.jwks_file),
        is_revoked=revocations.is_revoked,
    )

Which methods need no token, and which roles or scopes each one admits, comes from the
contracts (``option (cake.access.v1.access)``), not from the service.
"""

from __future__ import annotations

from pathlib import Path

import redis.asyncio

from cake_common.jwt import FileJwksProvider, JwtVerifier
from cake_common.redis import create_redis
from cake_common.revocation import STREAM_TIMEOUT_SECONDS, RevocationList
from cake_common.settings import ServiceSettings


def token_verifier(settings: ServiceSettings, jwks_file: Path) -> JwtVerifier:
    """Verifies ES256 access tokens against the JWKS file with the service's claims."""
    return JwtVerifier(
        FileJwksProvider(jwks_file),
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        leeway_seconds=settings.jwt_leeway_seconds,
    )


def revocation_list(settings: ServiceSettings, client: redis.asyncio.Redis) -> RevocationList:
    """The shared revocation list (sessions and tokens ended by the auth service), with a
    connection of its own for following the revocation stream."""
    return RevocationList(
        client,
        stream_client=create_redis(
            settings.redis_url, timeout_seconds=STREAM_TIMEOUT_SECONDS, max_connections=2
        ),
        key_prefix=settings.revocation_key_prefix,
    )
