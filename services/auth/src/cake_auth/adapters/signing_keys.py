"""ES256 signing keys on disk, the published JWK Set, and the token issuer.

Layout written by ``cake-auth gen-keys --dir DIR`` (a cross-service agreement):

- ``DIR/jwt-signing-key.pem``: EC P-256 private key, PKCS8 PEM, mode 0600;
- ``DIR/jwks.json``: ``{"keys": [...]}``, the new public key first, older keys kept so tokens
  they signed stay verifiable while they live (rotation).

Every key id is the RFC 7638 thumbprint of the public key, so it is derived, never chosen.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
from cake_common.jwt import ALLOWED_ALGORITHM, jwk_from_public_key
from cake_common.logging import get_logger
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cake_auth.domain.tokens import AccessToken, access_token_claims, service_token_claims
from cake_auth.domain.users import Role

SIGNING_KEY_FILENAME = "jwt-signing-key.pem"
JWKS_FILENAME = "jwks.json"

_log = get_logger(__name__)


class SigningKeyError(Exception):
    """The signing key or the published key set is missing, unreadable or inconsistent."""


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 thumbprint (SHA-256, base64url) of an EC public JWK."""
    required = {name: jwk[name] for name in ("crv", "kty", "x", "y")}
    canonical = json.dumps(required, separators=(",", ":"), sort_keys=True)
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def public_jwk(public_key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    """The published JWK of a key, its ``kid`` being its thumbprint."""
    bare: dict[str, str] = jwt.algorithms.ECAlgorithm.to_jwk(public_key, as_dict=True)
    return jwk_from_public_key(public_key, jwk_thumbprint(bare))


@dataclass(frozen=True, slots=True)
class SigningKey:
    private_key: ec.EllipticCurvePrivateKey
    jwk: dict[str, str]

    @property
    def kid(self) -> str:
        return self.jwk["kid"]

    @classmethod
    def from_private_key(cls, private_key: ec.EllipticCurvePrivateKey) -> SigningKey:
        return cls(private_key, public_jwk(private_key.public_key()))


def load_signing_key(path: Path) -> SigningKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as error:
        raise SigningKeyError(f"cannot read the signing key {path}: {error}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise SigningKeyError(f"{path} is not an EC P-256 private key")
    return SigningKey.from_private_key(key)


def read_jwks(path: Path) -> list[dict[str, Any]]:
    """The keys of a JWK Set file (no validation beyond its shape)."""
    try:
        document = json.loads(path.read_bytes())
    except (OSError, ValueError) as error:
        raise SigningKeyError(f"cannot read the key set {path}: {error}") from None
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list) or not all(isinstance(key, dict) for key in keys):
        raise SigningKeyError(f"{path} is not a JWK Set (no 'keys' list of objects)")
    return keys


def ensure_published(signing_key: SigningKey, jwks_path: Path) -> None:
    """Refuse to start unless the key set publishes the signing key's public part: tokens
    signed with an unpublished key would be rejected by every verifier."""
    for key in read_jwks(jwks_path):
        if key.get("kid") == signing_key.kid:
            if (key.get("x"), key.get("y")) != (signing_key.jwk["x"], signing_key.jwk["y"]):
                raise SigningKeyError(
                    f"{jwks_path} has a key {signing_key.kid} that is not the signing key"
                )
            return
    raise SigningKeyError(
        f"the signing key {signing_key.kid} is not published in {jwks_path}; "
        "run `cake-auth gen-keys` or add its public JWK there"
    )


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    # Readers (FileJwksProvider re-reads on change, k8s-style mounts) never see half a file.
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def generate_key_pair(directory: Path) -> SigningKey:
    """Write a new signing key and publish it first in the directory's key set.

    Keys already in ``jwks.json`` stay published, so tokens signed by the previous key
    remain valid until they expire; remove old keys by hand once that has happened.
    """
    directory.mkdir(parents=True, exist_ok=True)
    jwks_path = directory / JWKS_FILENAME
    previous = read_jwks(jwks_path) if jwks_path.exists() else []
    signing_key = SigningKey.from_private_key(ec.generate_private_key(ec.SECP256R1()))
    keys = [signing_key.jwk, *(key for key in previous if key.get("kid") != signing_key.kid)]
    pem = signing_key.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # The public key first: a crash in between leaves an extra published key, never a
    # signing key that no verifier knows.
    _write_atomically(jwks_path, (json.dumps({"keys": keys}, indent=2) + "\n").encode(), 0o644)
    _write_atomically(directory / SIGNING_KEY_FILENAME, pem, 0o600)
    return signing_key


def _publishable(key: Mapping[str, Any]) -> bool:
    """Only keys that can verify a Cake token (EC P-256, ES256 signatures) are published."""
    return (
        key.get("kty") == "EC"
        and key.get("crv") == "P-256"
        and all(isinstance(key.get(name), str) and key[name] for name in ("kid", "x", "y"))
        and key.get("use", "sig") == "sig"
        and key.get("alg", ALLOWED_ALGORITHM) == ALLOWED_ALGORITHM
    )


class JwksFile:
    """The published key set, re-read when the file changes, signing key first."""

    def __init__(self, path: Path, signing_kid: str) -> None:
        self._path = path
        self._signing_kid = signing_kid
        self._stamp: tuple[int, int, int] | None = None
        self._keys: list[dict[str, Any]] = []
        self._reload_if_changed()

    def _reload_if_changed(self) -> None:
        try:
            stat = self._path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            if stamp == self._stamp:
                return
            keys = read_jwks(self._path)
        except (OSError, SigningKeyError) as error:
            if self._stamp is None:
                raise SigningKeyError(str(error)) from None
            _log.warning("jwks file unreadable, publishing the previous keys", error=str(error))
            return
        usable = [key for key in keys if _publishable(key)]
        usable.sort(key=lambda key: key.get("kid") != self._signing_kid)
        self._keys = usable
        self._stamp = stamp

    def public_keys(self) -> Sequence[dict[str, Any]]:
        self._reload_if_changed()
        return self._keys


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Es256TokenIssuer:
    """Signs Cake access tokens (ES256, ``kid`` header) with the configured key."""

    def __init__(
        self,
        signing_key: SigningKey,
        *,
        issuer: str,
        audience: str,
        ttl_seconds: int,
        service_ttl_seconds: int = 300,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self._key = signing_key
        self._issuer = issuer
        self._audience = audience
        self._ttl = ttl_seconds
        self._service_ttl = service_ttl_seconds
        self._clock = clock

    def _sign(self, claims: dict[str, Any]) -> str:
        return jwt.encode(
            claims,
            self._key.private_key,
            algorithm=ALLOWED_ALGORITHM,
            headers={"kid": self._key.kid},
        )

    def issue_service(
        self, client_id: str, scopes: Sequence[str], *, session_id: str
    ) -> AccessToken:
        """A service account's token (client credentials grant), ``service_ttl_seconds``."""
        issued_at = self._clock().replace(microsecond=0)
        jti = str(uuid.uuid4())
        claims = service_token_claims(
            client_id=client_id,
            scopes=scopes,
            issuer=self._issuer,
            audience=self._audience,
            issued_at=issued_at,
            ttl_seconds=self._service_ttl,
            jti=jti,
            session_id=session_id,
        )
        return AccessToken(
            token=self._sign(claims),
            jti=jti,
            expires_at=datetime.fromtimestamp(claims["exp"], tz=UTC),
            session_id=session_id,
            issued_at=issued_at,
        )

    def issue(
        self,
        user_id: int,
        role: Role | str,
        *,
        session_id: str | None = None,
        not_after: datetime | None = None,
    ) -> AccessToken:
        """A signed token; without ``session_id`` it names a fresh session id that no
        session row has (operator tooling and tests: such a token cannot be refreshed)."""
        # JWT times are whole seconds: truncate once so `exp` and `expires_at` agree.
        issued_at = self._clock().replace(microsecond=0)
        jti = str(uuid.uuid4())
        sid = session_id if session_id is not None else uuid.uuid4().hex
        claims = access_token_claims(
            user_id=user_id,
            role=role,
            issuer=self._issuer,
            audience=self._audience,
            issued_at=issued_at,
            ttl_seconds=self._ttl,
            jti=jti,
            session_id=sid,
            not_after=not_after,
        )
        return AccessToken(
            token=self._sign(claims),
            jti=jti,
            expires_at=datetime.fromtimestamp(claims["exp"], tz=UTC),
            session_id=sid,
            issued_at=issued_at,
        )
