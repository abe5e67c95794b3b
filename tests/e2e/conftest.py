"""Fixtures shared by the end-to-end tests: the stack's development signing key and admin
tokens signed with it (by the auth service's own issuer, so they are what auth would mint)."""

from __future__ import annotations

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
