"""How the stack's services prove themselves to auth: service accounts (development only).

Notifications reads users' contacts from auth (``GetUserContacts``, scope
``users:read-contacts``) with tokens it requests from auth itself (OAuth 2.0 client
credentials, 5-minute tokens). Both deployments give it a real service account:

* the local stack runs ``cake-auth create-service-account notifications --rotate-secret`` at
  every start and keeps the secret it prints in a 0600 file next to the keys;
* the dev cluster (Tiltfile, ``make k8s-test``) cannot run the command before its manifests
  are made, so the tooling generates the secret first (:func:`ensure_client_secret`, once,
  kept in ``.run/k8s-dev/keys``) and puts it in the Secret ``notifications-auth-client``;
  the ``auth-service-accounts`` Job registers it with ``cake-auth create-service-account
  --secret-file`` (a no-op when the account already has it) and notifications reads it.

No token is ever signed here: a long-lived token would bypass the account's revocation.
"""

from __future__ import annotations

import argparse
import secrets
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from cake_devtools.stack.credentials import write_private
from cake_devtools.stack.errors import StackError

NOTIFICATIONS_CLIENT_ID = "notifications"
CONTACTS_SCOPE = "users:read-contacts"


def ensure_client_secret(path: Path) -> str:
    """The client secret kept in ``path``; made (256 random bits, URL-safe, 0600) if missing."""
    if not path.is_file():
        write_private(path, secrets.token_urlsafe(32))
    return path.read_text().strip()


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
    """``python -m cake_devtools.stack.service_tokens FILE``: make the dev cluster's
    notifications client secret in FILE if it is not there (the Tiltfile runs this)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("secret_file", type=Path)
    ensure_client_secret(parser.parse_args(argv).secret_file)


if __name__ == "__main__":
    main()
