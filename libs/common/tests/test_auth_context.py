from __future__ import annotations

from datetime import UTC, datetime

import pytest
from cake_common.auth_context import current_principal, principal_var, require_admin
from cake_common.errors import PermissionDenied, Unauthenticated
from cake_common.jwt import Principal


def test_no_principal_is_unauthenticated() -> None:
    with pytest.raises(Unauthenticated):
        current_principal()
    with pytest.raises(Unauthenticated):
        require_admin()


def test_user_is_not_admin() -> None:
    token = principal_var.set(Principal(1, "user", "j", datetime.now(UTC)))
    try:
        assert current_principal().user_id == 1
        with pytest.raises(PermissionDenied) as caught:
            require_admin()
        assert caught.value.reason == "ADMIN_ROLE_REQUIRED"
    finally:
        principal_var.reset(token)


def test_admin_passes() -> None:
    token = principal_var.set(Principal(2, "admin", "j", datetime.now(UTC)))
    try:
        assert require_admin().user_id == 2
    finally:
        principal_var.reset(token)
