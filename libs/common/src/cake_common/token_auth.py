"""The token check every service runs, built from its settings in one place.

Each service's composition root calls these so that the verifier (issuer, audience,
clock-skew leeway) and the revocation list (Redis namespace) are configured identically
everywhere::

    revocations = followed_revocation_list(settings, redis_client, start_up)
    builder.with_auth(required_token_verifier(settings), is_revoked=revocations.is_revoked)

Which methods need no token, and which roles or scopes each one admits, comes from the
contracts (``option (cake.access.v1.access)``), not from the service.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import redis.asyncio
from pydantic import SecretStr

from cake_common.jwt import FileJwksProvider, JwtVerifier
from cake_common.redis import create_redis
from cake_common.revocation import STREAM_TIMEOUT_SECONDS, RevocationList
from cake_common.settings import ServiceSettings

if TYPE_CHECKING:
    from cake_common.service_runtime import StartUp


def token_verifier(settings: ServiceSettings, jwks_file: Path) -> JwtVerifier:
    """Verifies ES256 access tokens against the JWKS file with the service's claims."""
    return JwtVerifier(
        FileJwksProvider(jwks_file),
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        leeway_seconds=settings.jwt_leeway_seconds,
    )


def stream_redis(url: str | SecretStr) -> redis.asyncio.Redis:
    """A Redis connection for one stream follower (``XREAD BLOCK`` holds it)."""
    return create_redis(url, timeout_seconds=STREAM_TIMEOUT_SECONDS, max_connections=2)


def revocation_list(settings: ServiceSettings, client: redis.asyncio.Redis) -> RevocationList:
    """The shared revocation list (sessions and tokens ended by the auth service), with a
    connection of its own for following the revocation stream."""
    return RevocationList(
        client,
        stream_client=stream_redis(settings.redis_url),
        key_prefix=settings.revocation_key_prefix,
    )


def required_token_verifier(settings: ServiceSettings) -> JwtVerifier:
    """:func:`token_verifier` on the service's ``jwks_file``; without one the service refuses
    to start (every non-public call needs a token checked there), naming its variable."""
    if settings.jwks_file is None:
        variable = f"{settings.model_config.get('env_prefix', '')}JWKS_FILE"
        raise SystemExit(f"{variable} must name the auth service's JWKS file")
    return token_verifier(settings, settings.jwks_file)


def followed_revocation_list(
    settings: ServiceSettings, client: redis.asyncio.Redis, start_up: StartUp
) -> RevocationList:
    """:func:`revocation_list`, following the revocation stream once the process serves and
    closed before the Redis client it reads (registered with ``start_up.runs``)."""
    revocations = revocation_list(settings, client)
    start_up.runs(revocations.start, revocations.aclose)
    return revocations
