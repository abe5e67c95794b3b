"""The ``cake-auth`` command line: key generation and ``create-admin`` against PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import jwt
import pytest
from cake.auth.v1 import auth_pb2
from cake_auth.adapters.signing_keys import JWKS_FILENAME, SIGNING_KEY_FILENAME
from cake_auth.entrypoints.cli import main, run_create_admin
from cake_auth.service.accounts import CreateAdmin

pytestmark = pytest.mark.integration

ADMIN_PASSWORD = "admin-password-123"


def test_gen_keys_writes_and_rotates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "keys"
    with pytest.raises(SystemExit) as exited:
        main(["gen-keys", "--dir", str(directory)])
    assert exited.value.code == 0
    first = json.loads((directory / JWKS_FILENAME).read_text())["keys"]
    assert len(first) == 1
    assert stat.S_IMODE((directory / SIGNING_KEY_FILENAME).stat().st_mode) == 0o600
    assert first[0]["kid"] in capsys.readouterr().out

    with pytest.raises(SystemExit):
        main(["gen-keys", "--dir", str(directory), "--if-missing"])
    assert "unchanged" in capsys.readouterr().out
    assert json.loads((directory / JWKS_FILENAME).read_text())["keys"] == first

    with pytest.raises(SystemExit):
        main(["gen-keys", "--dir", str(directory)])
    rotated = json.loads((directory / JWKS_FILENAME).read_text())["keys"]
    assert [key["kid"] for key in rotated][1:] == [first[0]["kid"]]


def _cake_auth(auth: Any, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``cake-auth`` as an operator would, configured only through the environment."""
    settings = auth.settings
    env = {
        **os.environ,
        "CAKE_AUTH_DATABASE_URL": settings.database_url.get_secret_value(),
        "CAKE_AUTH_REDIS_URL": settings.redis_url.get_secret_value(),
        "CAKE_AUTH_REDIS_KEY_PREFIX": settings.redis_key_prefix,
        "CAKE_AUTH_BCRYPT_COST": str(settings.bcrypt_cost),
    }
    return subprocess.run(
        [sys.executable, "-m", "cake_auth", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def _run(auth: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(_cake_auth, auth, *args)


async def _role_after_login(auth: Any, account: str, password: str) -> str:
    response = await auth.stub.Login(auth_pb2.LoginRequest(account=account, password=password))
    role: str = jwt.decode(response.access_token, options={"verify_signature": False})["role"]
    return role


async def test_create_admin_creates_a_user_with_the_admin_role(auth: Any) -> None:
    details = auth.registration()
    result = await _run(
        auth,
        "create-admin",
        "--username",
        details.username,
        "--email",
        details.email,
        "--phone",
        details.phone,
        "--password",
        ADMIN_PASSWORD,
    )
    assert result.returncode == 0, result.stderr
    assert f"created admin user '{details.username}'" in result.stdout
    assert ADMIN_PASSWORD not in result.stdout + result.stderr
    assert await _role_after_login(auth, details.username, ADMIN_PASSWORD) == "admin"


async def _create_admin_in_process(
    auth: Any, capsys: pytest.CaptureFixture[str], **fields: str
) -> tuple[int, str, str]:
    """The command's body without a new interpreter (the entry point is covered above)."""
    status = await run_create_admin(auth.settings, CreateAdmin(**fields))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


async def test_create_admin_promotes_an_existing_user(
    auth: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    registered = await auth.register()
    assert await _role_after_login(auth, registered.user.email, "correct horse battery") == "user"
    status, out, err = await _create_admin_in_process(
        auth,
        capsys,
        username=registered.user.username.upper(),
        email=auth.registration().email,
        phone=auth.registration().phone,
        password=ADMIN_PASSWORD,
    )
    assert status == 0, err
    assert "promoted existing user" in out
    # The password (like e-mail and phone) is left as the user set it.
    assert await _role_after_login(auth, registered.user.email, "correct horse battery") == "admin"


async def test_create_admin_validates_like_registration(
    auth: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = await _create_admin_in_process(
        auth,
        capsys,
        username="x!",
        email="not-an-email",
        phone="12",
        password="123",
        birthday="2999-01-01",
    )
    assert status == 1
    for field in ("username", "email", "phone", "password"):
        assert f"  {field}: " in err
    assert "123" not in out

    taken = (await auth.register()).user
    status, _, err = await _create_admin_in_process(
        auth,
        capsys,
        username=auth.registration().username,
        email=taken.email,
        phone=auth.registration().phone,
        password=ADMIN_PASSWORD,
    )
    assert status == 1
    assert "Email already exists" in err

    status, _, err = await _create_admin_in_process(
        auth,
        capsys,
        username=auth.registration().username,
        email=auth.registration().email,
        phone=auth.registration().phone,
        password=ADMIN_PASSWORD,
        birthday="2999-01-01",
    )
    assert status == 1
    assert "  birthday: must be in the past" in err
