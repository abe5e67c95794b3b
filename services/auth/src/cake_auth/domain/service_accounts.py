"""Service accounts: machine clients that get short-lived access tokens with the OAuth 2.0
client credentials grant (RFC 6749 section 4.4). Pure rules, no I/O.

A token of a service account has role ``service``, the client id as ``sub`` and the granted
scopes, space-separated, in ``scope``. Its ``sid`` is the account's current *generation*:
disabling the account or rotating its secret starts a new generation and revokes the old one
on the shared revocation list, so every token issued before is refused by every service.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from cake_common.errors import CakeError, InvalidArgument, Unauthenticated
from cake_common.jwt import SERVICE_ROLE

CLIENT_CREDENTIALS = "client_credentials"
CLIENT_ID_PATTERN = re.compile(r"[a-z][a-z0-9-]{2,62}")
# RFC 6749 section 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E ); Cake's are narrower.
SCOPE_PATTERN = re.compile(r"[a-z][a-z0-9._:-]{0,63}")
MAX_SCOPES = 32

__all__ = ["SERVICE_ROLE"]


# -- RFC 6749 section 5.2 errors -------------------------------------------------------------
# The reason of each error is the RFC's error code; the gateway answers REST clients with
# {"error": reason, "error_description": message}, and the status gRPC gives (401 for a
# client that could not be authenticated, 400 for the rest).


def invalid_request(message: str) -> CakeError:
    return InvalidArgument(message, reason="invalid_request")


def invalid_client(message: str = "Client authentication failed") -> CakeError:
    return Unauthenticated(message, reason="invalid_client")


def unsupported_grant_type(grant_type: str) -> CakeError:
    return InvalidArgument(
        "Only the client_credentials grant is supported"
        if grant_type
        else "grant_type is required",
        reason="unsupported_grant_type" if grant_type else "invalid_request",
    )


def invalid_scope(message: str) -> CakeError:
    return InvalidArgument(message, reason="invalid_scope")


def valid_client_id(client_id: str) -> bool:
    return CLIENT_ID_PATTERN.fullmatch(client_id) is not None


def parse_scopes(text: str | Iterable[str]) -> frozenset[str]:
    """The scope tokens of a space-separated ``scope`` (or a list of them); ``ValueError`` for
    a token Cake never grants (bad characters, too many)."""
    tokens = text.split() if isinstance(text, str) else [t for item in text for t in item.split()]
    for token in tokens:
        if SCOPE_PATTERN.fullmatch(token) is None:
            raise ValueError(f"invalid scope {token!r}: lower-case letters, digits and ._:-")
    scopes = frozenset(tokens)
    if len(scopes) > MAX_SCOPES:
        raise ValueError(f"at most {MAX_SCOPES} scopes")
    return scopes


def scope_text(scopes: Iterable[str]) -> str:
    return " ".join(sorted(scopes))


def granted_scopes(requested: str, allowed: frozenset[str]) -> frozenset[str]:
    """RFC 6749 section 3.3: an empty request gets every scope of the account; otherwise the
    request must be a subset of the account's scopes (``invalid_scope``)."""
    try:
        wanted = parse_scopes(requested)
    except ValueError as error:
        raise invalid_scope(str(error)) from None
    if not wanted:
        return allowed
    extra = wanted - allowed
    if extra:
        raise invalid_scope(f"Scope not granted to this client: {scope_text(extra)}")
    return wanted


def new_client_secret() -> str:
    """256 random bits, URL-safe (no character needs escaping in a form or Basic header)."""
    return secrets.token_urlsafe(32)


def hash_client_secret(secret: str) -> str:
    # SHA-256, not bcrypt: the secret is 256 random bits, so nothing can be guessed and a
    # slow hash would only cost CPU on every token request (RFC 6819 section 5.1.4.1.3 asks
    # for hashing; slowness matters for low-entropy passwords).
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(secret: str, secret_hash: str) -> bool:
    return hmac.compare_digest(hash_client_secret(secret), secret_hash)


def new_generation() -> str:
    """The ``sid`` a service account's tokens carry until its next disable or rotation."""
    return "svc-" + secrets.token_hex(16)


@dataclass(frozen=True, slots=True)
class ServiceAccount:
    id: int
    client_id: str
    secret_hash: str
    scopes: frozenset[str]
    generation: str
    created_at: datetime
    disabled_at: datetime | None = None

    @property
    def enabled(self) -> bool:
        return self.disabled_at is None


@dataclass(frozen=True, slots=True)
class ClientCredentials:
    client_id: str
    client_secret: str


def client_from_request(
    *, basic: ClientCredentials | None, client_id: str, client_secret: str
) -> ClientCredentials:
    """The client's credentials from HTTP Basic or the request parameters (RFC 6749 section
    2.3.1); using both is ``invalid_request``, neither ``invalid_client``."""
    if basic is not None:
        if client_secret or (client_id and client_id != basic.client_id):
            raise invalid_request("Use one client authentication method, not two")
        return basic
    if not client_id or not client_secret:
        raise invalid_client("Client authentication is required")
    return ClientCredentials(client_id, client_secret)
