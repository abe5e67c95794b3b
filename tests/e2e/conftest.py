"""Fixtures shared by the end-to-end tests: the stack's development signing key and admin
tokens signed with it (by the auth service's own issuer, so they are what auth would mint)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import pytest
from cake_auth.adapters.signing_keys import Es256TokenIssuer, SigningKey, load_signing_key
from cake_auth.settings import AuthSettings
from cake_devtools.stack import Stack

ADMIN_TOKEN_TTL_SECONDS = 600


@pytest.fixture(scope="module")
def signing_key(full_stack: Stack) -> SigningKey:
    return load_signing_key(full_stack.run_dir / "keys" / "jwt-signing-key.pem")


@pytest.fixture
def admin_token(signing_key: SigningKey) -> str:
    """An access token of user 1 with the admin role, valid for ten minutes."""
    defaults = AuthSettings.model_fields
    issuer = Es256TokenIssuer(
        signing_key,
        issuer=defaults["jwt_issuer"].default,
        audience=defaults["jwt_audience"].default,
        ttl_seconds=ADMIN_TOKEN_TTL_SECONDS,
    )
    return issuer.issue(1, "admin").token


@pytest.fixture(scope="module")
def create_admin(full_stack: Stack) -> Callable[[str, str, str, str], None]:
    """Runs ``cake-auth create-admin`` against the stack (username, e-mail, phone, password)."""

    def create(username: str, email: str, phone: str, password: str) -> None:
        env = {**os.environ, **full_stack.service_environment()["auth"]}
        created = subprocess.run(
            [
                *(sys.executable, "-m", "cake_auth", "create-admin", "--username", username),
                *("--email", email, "--phone", phone, "--password", password),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert created.returncode == 0, created.stderr

    return create
