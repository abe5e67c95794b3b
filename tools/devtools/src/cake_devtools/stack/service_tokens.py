"""How the stack's services prove themselves to auth: service accounts (development only).

Notifications reads users' contacts from auth (``GetUserContacts``, scope
``users:read-contacts``). The local stack gives it a real service account: at every start
``cake-auth create-service-account notifications --rotate-secret`` makes (or re-keys) it and
the secret goes into a 0600 file next to the keys; notifications then requests its tokens
from auth (client credentials). The dev cluster (Tiltfile, k8s-test) has no auth running
when its manifests are made, so there a service token is signed with the development key
instead and mounted as a Secret.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import jwt

from cake_devtools.stack.credentials import write_private
from cake_devtools.stack.errors import StackError

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


NOTIFICATIONS_CLIENT_ID = "notifications"
CONTACTS_SCOPE = "users:read-contacts"


def ensure_notifications_token(signing_key: Path, jwks_file: Path, path: Path) -> None:
    """A fresh service token of the notifications account (dev cluster only)."""
    token = mint_token(
        signing_key,
        jwks_file,
        subject=NOTIFICATIONS_CLIENT_ID,
        role="service",
        scopes=[CONTACTS_SCOPE],
    )
    write_private(path, token)


def create_service_account(
    command: Sequence[str], environment: Mapping[str, str], secret_file: Path
) -> None:
    """Run ``command`` (``cake-auth create-service-account ... --rotate-secret``) and keep
    the secret it prints in ``secret_file`` (0600); the secret never reaches a log."""
    result = subprocess.run(
        command, env=dict(environment), capture_output=True, text=True, check=False
    )
    secret = next(
        (
            line.split("=", 1)[1].strip()
            for line in result.stdout.splitlines()
            if line.startswith("client_secret=")
        ),
        None,
    )
    if result.returncode != 0 or not secret:
        raise StackError(f"cake-auth create-service-account failed:\n{result.stderr.strip()}")
    write_private(secret_file, secret)


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
