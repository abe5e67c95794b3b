"""Tokens the stack gives its services to call each other (development keys only).

Notifications reads users' contacts from auth's user directory with a bearer token. Until
auth issues service-account tokens itself, the stack signs one with the development key
(``.run/<profile>/keys``), writes it next to the keys (mode 0600) and renews it at every
start; a deployment mounts its own.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import jwt

ISSUER = "cake-system"
AUDIENCE = "cake-users"
TOKEN_TTL_SECONDS = 30 * 24 * 3600


def mint_token(
    signing_key: Path,
    jwks_file: Path,
    *,
    subject: str,
    role: str,
    scopes: Sequence[str] = (),
    ttl_seconds: int = TOKEN_TTL_SECONDS,
) -> str:
    """An ES256 token signed with ``signing_key``, named by the JWKS's (first) key id."""
    kid = json.loads(jwks_file.read_text())["keys"][0]["kid"]
    now = int(time.time())
    claims: dict[str, object] = {
        "sub": subject,
        "role": role,
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + ttl_seconds,
        "jti": str(uuid.uuid4()),
        "sid": uuid.uuid4().hex,
    }
    if scopes:
        claims["scope"] = " ".join(scopes)
    return jwt.encode(claims, signing_key.read_bytes(), algorithm="ES256", headers={"kid": kid})


def write_token(path: Path, token: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as token_file:
        token_file.write(token)


def ensure_notifications_token(signing_key: Path, jwks_file: Path, path: Path) -> None:
    """A fresh token for notifications → auth's user directory.

    Auth does not issue service-account tokens yet, and its token check only knows user
    tokens: this one is an admin token of no real user (id 0), which the directory accepts.
    """
    write_token(path, mint_token(signing_key, jwks_file, subject="0", role="admin"))


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m cake_devtools.stack.service_tokens --keys-dir DIR --out FILE`` (the
    Tiltfile: the dev cluster's token, from the same development keys)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--keys-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    ensure_notifications_token(
        args.keys_dir / "jwt-signing-key.pem", args.keys_dir / "jwks.json", args.out
    )


if __name__ == "__main__":
    main()
