"""Verification of Cake access tokens (ES256 JWTs issued by the auth service).

Signing lives in the auth service; every service verifies, because internal gRPC callers
bypass Envoy's edge check. Only ES256 with a known ``kid`` is accepted: ``alg=none``,
HS* (the classic "public key used as HMAC secret" attack) and RS* are rejected before
any key is touched.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from cake_common.errors import Unauthenticated, Unavailable
from cake_common.logging import get_logger

ALLOWED_ALGORITHM = "ES256"
ADMIN_ROLE = "admin"
SERVICE_ROLE = "service"
"""The role of a service account's token (OAuth 2.0 client credentials): its ``sub`` is the
client id, not a user id, and its ``scope`` claim (space-separated, RFC 8693 section 4.2)
lists what it may do."""
_INVALID = "TOKEN_INVALID"
_REQUIRED_CLAIMS = ("sub", "role", "iss", "aud", "iat", "exp", "jti", "sid")
_MAX_USER_ID = 2**63 - 1
_MAX_SESSION_ID = 64
_CLIENT_ID = re.compile(r"[a-z][a-z0-9-]{2,62}")
_MAX_SCOPES = 32

_log = get_logger(__name__)

JwksDocument = Mapping[str, Any] | str | bytes
"""A JWKS as a decoded mapping (``{"keys": [...]}``) or its JSON text."""


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller, taken from a verified access token."""

    user_id: int
    role: str
    jti: str
    expires_at: datetime
    session_id: str = ""
    """The server-side session the token belongs to (claim ``sid``); revoking it refuses
    every token of the session. A service account's tokens share one per account generation,
    so disabling the account or rotating its secret refuses them all."""
    client_id: str = ""
    """The service account (``sub`` of a ``service`` token); empty for users, whose
    ``user_id`` is then set (a service token's ``user_id`` is 0, which no user has)."""
    scopes: frozenset[str] = frozenset()
    """The token's OAuth scopes (claim ``scope``); only service tokens carry any."""
    issued_at: datetime | None = None
    """When the token was issued (claim ``iat``, whole seconds)."""

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN_ROLE

    @property
    def is_service(self) -> bool:
        return self.role == SERVICE_ROLE


def parse_jwks(document: JwksDocument) -> dict[str, jwt.PyJWK]:
    """Index the usable signing keys of a JWKS by ``kid``.

    Keys that could never verify a Cake token (no ``kid``, not EC P-256, ``use`` other than
    ``sig``) are skipped rather than failing the whole set, so a rotation that adds a key
    of another kind does not lock everyone out.
    """
    data = json.loads(document) if isinstance(document, str | bytes) else document
    keys = data.get("keys")
    if not isinstance(keys, list):
        raise ValueError("JWKS has no 'keys' list")
    usable: dict[str, jwt.PyJWK] = {}
    for entry in keys:
        if not isinstance(entry, Mapping):
            continue
        kid = entry.get("kid")
        if not isinstance(kid, str) or not kid:
            _log.warning("jwks key skipped", why="no kid")
            continue
        if entry.get("kty") != "EC" or entry.get("crv") != "P-256":
            _log.warning("jwks key skipped", kid=kid, why="not an EC P-256 key")
            continue
        if entry.get("use", "sig") != "sig" or entry.get("alg", ALLOWED_ALGORITHM) != "ES256":
            _log.warning("jwks key skipped", kid=kid, why="not an ES256 signing key")
            continue
        try:
            usable[kid] = jwt.PyJWK(dict(entry), algorithm=ALLOWED_ALGORITHM)
        except jwt.PyJWTError as error:
            _log.warning("jwks key skipped", kid=kid, why=str(error))
    return usable


def jwk_from_public_key(public_key: bytes | ec.EllipticCurvePublicKey, kid: str) -> dict[str, str]:
    """The public JWK (``kty, crv, x, y, kid, use, alg``) of an EC P-256 key given as PEM."""
    key = load_pem_public_key(public_key) if isinstance(public_key, bytes) else public_key
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("only EC P-256 public keys can sign Cake tokens")
    jwk: dict[str, str] = jwt.algorithms.ECAlgorithm.to_jwk(key, as_dict=True)
    jwk.update(kid=kid, use="sig", alg=ALLOWED_ALGORITHM)
    return jwk


class JwksProvider(Protocol):
    """Source of verification keys, looked up by ``kid``."""

    async def get_key(self, kid: str) -> jwt.PyJWK | None:
        """The key with this id, or ``None`` if the set has no such key."""
        ...


class StaticJwksProvider:
    """A fixed key set (tests, or keys baked into configuration)."""

    def __init__(self, document: JwksDocument) -> None:
        self._keys = parse_jwks(document)

    async def get_key(self, kid: str) -> jwt.PyJWK | None:
        return self._keys.get(kid)


class FileJwksProvider:
    """A JWKS file (e.g. a mounted k8s Secret), re-read whenever it changes on disk."""

    def __init__(self, path: Path | str) -> None:
        self._path = Path(path)
        self._stamp: tuple[int, int, int] | None = None
        self._keys: dict[str, jwt.PyJWK] | None = None

    def _reload_if_changed(self) -> None:
        # Stat is ~1 µs against ~150 µs for the signature check, so checking on every
        # lookup is cheaper than any timer and picks up k8s Secret updates at once.
        try:
            stat = self._path.stat()
            stamp: tuple[int, int, int] | None = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except OSError:
            stamp = None
        if stamp != self._stamp:
            # Recorded even if loading fails, so a broken file is reported once, not per call.
            self._stamp = stamp
            self._load()
        if self._keys is None:
            raise Unavailable("Signing keys are unavailable")

    def _load(self) -> None:
        try:
            keys = parse_jwks(self._path.read_bytes())
        except (OSError, ValueError) as error:
            _log.warning(
                "jwks file unusable, keeping previous keys",
                path=str(self._path),
                error=repr(error),
                have_keys=self._keys is not None,
            )
            return
        self._keys = keys
        _log.info("jwks loaded", path=str(self._path), kids=sorted(keys))

    async def get_key(self, kid: str) -> jwt.PyJWK | None:
        self._reload_if_changed()
        assert self._keys is not None
        return self._keys.get(kid)


class FetchingJwksProvider:
    """Keys fetched by an async function (e.g. a gRPC call to the auth service).

    The set is refreshed every ``refresh_interval_seconds`` and, to follow key rotation,
    also when a token names an unknown ``kid`` — but at most once per
    ``min_refresh_interval_seconds`` so tokens with made-up kids cannot flood the source.
    If the source fails, the last good keys stay in use.
    """

    def __init__(
        self,
        fetch: Callable[[], Awaitable[JwksDocument]],
        *,
        refresh_interval_seconds: float = 300.0,
        min_refresh_interval_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._refresh_interval = refresh_interval_seconds
        self._min_refresh_interval = min_refresh_interval_seconds
        self._clock = clock
        self._keys: dict[str, jwt.PyJWK] | None = None
        self._loaded_at = float("-inf")
        self._attempted_at = float("-inf")
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        """Fetch the key set now; failures are logged and the previous keys kept."""
        async with self._lock:
            await self._refresh_locked()

    async def _refresh_locked(self) -> None:
        self._attempted_at = self._clock()
        try:
            keys = parse_jwks(await self._fetch())
        except Exception as error:
            _log.warning("jwks fetch failed", error=repr(error))
            return
        self._keys = keys
        self._loaded_at = self._clock()

    async def _refresh_if(self, is_due: Callable[[], bool]) -> None:
        if not is_due():
            return
        async with self._lock:
            # Another caller may have refreshed while this one waited for the lock.
            if is_due():
                await self._refresh_locked()

    def _may_attempt(self) -> bool:
        return self._clock() - self._attempted_at >= self._min_refresh_interval

    async def get_key(self, kid: str) -> jwt.PyJWK | None:
        await self._refresh_if(
            lambda: (
                self._clock() - self._loaded_at >= self._refresh_interval and self._may_attempt()
            )
        )
        if self._keys is None or kid not in self._keys:
            await self._refresh_if(self._may_attempt)
        if self._keys is None:
            raise Unavailable("Signing keys are unavailable")
        return self._keys.get(kid)


VERIFIED_CACHE_SIZE = 4096
"""Tokens a verifier remembers as verified. A repeat caller (a client reading its profile
again with the same access token) then costs a dict lookup instead of the base64 decoding,
the per-character segment checks and the ECDSA verification (≈ 0.3 ms of CPU, measured by
bench/login_profile.py with cProfile); 4096 tokens of ≈ 0.6 kB are a few MB."""


@dataclass(frozen=True, slots=True)
class _Verified:
    principal: Principal
    kid: str
    key: jwt.PyJWK
    expires_at: float


class JwtVerifier:
    """Checks a bearer token and returns its :class:`Principal`, or raises ``Unauthenticated``."""

    def __init__(
        self,
        jwks_provider: JwksProvider,
        *,
        issuer: str,
        audience: str,
        leeway_seconds: float = 0,
        cache_size: int = VERIFIED_CACHE_SIZE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``clock``: the wall clock (seconds since the epoch) the memory of verified tokens
        checks expiry against; a full verification always uses the real time."""
        self._jwks = jwks_provider
        self._clock = clock
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway_seconds
        self._verified: dict[str, _Verified] = {}
        self._cache_size = cache_size

    async def verify(self, token: str) -> Principal:
        """The token's principal; a token already verified (the same string, so the same
        signature over the same claims) is not verified again while its key is still the
        one published under its kid and it has not expired. Expiry and key removal are
        checked on every call; revocation is the caller's check (``is_revoked``) anyway."""
        cached = self._verified.get(token)
        if cached is not None:
            if (
                self._clock() < cached.expires_at + self._leeway
                and await self._jwks.get_key(cached.kid) is cached.key
            ):
                return cached.principal
            del self._verified[token]
        principal, kid, key = await self._verify_fully(token)
        if len(self._verified) >= self._cache_size:
            # Oldest first (dicts keep insertion order): a bounded cache, no LRU bookkeeping.
            del self._verified[next(iter(self._verified))]
        self._verified[token] = _Verified(principal, kid, key, principal.expires_at.timestamp())
        return principal

    async def _verify_fully(self, token: str) -> tuple[Principal, str, jwt.PyJWK]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("Invalid token", reason=_INVALID) from None
        if header.get("alg") != ALLOWED_ALGORITHM:
            raise Unauthenticated("Unsupported token algorithm", reason=_INVALID)
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Unauthenticated("Token has no key id", reason=_INVALID)
        key = await self._jwks.get_key(kid)
        if key is None:
            raise Unauthenticated("Unknown token signing key", reason=_INVALID)
        claims = self._decode(token, key)
        return _principal_from_claims(claims), kid, key

    def _decode(self, token: str, key: jwt.PyJWK) -> dict[str, Any]:
        try:
            return jwt.decode(
                token,
                key=key,
                algorithms=[ALLOWED_ALGORITHM],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": list(_REQUIRED_CLAIMS), "strict_aud": False},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("Token has expired", reason="TOKEN_EXPIRED") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated("Invalid token audience", reason=_INVALID) from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated("Invalid token issuer", reason=_INVALID) from None
        except jwt.MissingRequiredClaimError as error:
            raise Unauthenticated(
                f"Token is missing the {error.claim} claim", reason=_INVALID
            ) from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("Token is not yet valid", reason=_INVALID) from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated("Invalid token signature", reason=_INVALID) from None
        except jwt.PyJWTError:
            raise Unauthenticated("Invalid token", reason=_INVALID) from None


def _service_principal(claims: Mapping[str, Any], session_id: str) -> Principal:
    subject, scope = claims["sub"], claims.get("scope", "")
    if not isinstance(subject, str) or not _CLIENT_ID.fullmatch(subject):
        raise Unauthenticated("Invalid token subject", reason=_INVALID)
    if not isinstance(scope, str) or len(scope) > 1024:
        raise Unauthenticated("Invalid token scope", reason=_INVALID)
    scopes = frozenset(scope.split())
    if len(scopes) > _MAX_SCOPES:
        raise Unauthenticated("Invalid token scope", reason=_INVALID)
    return Principal(
        user_id=0,
        role=SERVICE_ROLE,
        jti=claims["jti"],
        expires_at=datetime.fromtimestamp(int(claims["exp"]), tz=UTC),
        session_id=session_id,
        client_id=subject,
        scopes=scopes,
        issued_at=datetime.fromtimestamp(int(claims["iat"]), tz=UTC),
    )


def _principal_from_claims(claims: Mapping[str, Any]) -> Principal:
    subject, role, jti = claims["sub"], claims["role"], claims["jti"]
    if not isinstance(jti, str) or not jti:
        raise Unauthenticated("Invalid token id", reason=_INVALID)
    session_id = claims["sid"]
    if not isinstance(session_id, str) or not session_id or len(session_id) > _MAX_SESSION_ID:
        raise Unauthenticated("Invalid token session", reason=_INVALID)
    if role == SERVICE_ROLE:
        return _service_principal(claims, session_id)
    # The auth service writes numeric user ids as decimal strings (JWT `sub` is a string);
    # ids are BIGINT everywhere, so a larger number can name no user (and would make the
    # database, not the token check, fail).
    if (
        not isinstance(subject, str)
        or not subject.isascii()
        or not subject.isdigit()
        or int(subject) > _MAX_USER_ID
    ):
        raise Unauthenticated("Invalid token subject", reason=_INVALID)
    if not isinstance(role, str) or not role:
        raise Unauthenticated("Invalid token role", reason=_INVALID)
    return Principal(
        user_id=int(subject),
        role=role,
        jti=jti,
        expires_at=datetime.fromtimestamp(int(claims["exp"]), tz=UTC),
        session_id=session_id,
        issued_at=datetime.fromtimestamp(int(claims["iat"]), tz=UTC),
    )
