"""Both bcrypt adapters produce and accept the same ``$2b$`` hashes, off the event loop."""

from __future__ import annotations

from collections.abc import AsyncIterator

import bcrypt
import pytest
from cake_auth.adapters.password_hashers import (
    BcryptThreadPoolHasher,
    LibxcryptProcessPoolHasher,
    open_password_hasher,
)
from cake_auth.service.ports import PasswordHasher

COST = 4


@pytest.fixture(scope="module")
async def bcrypt_hasher() -> AsyncIterator[PasswordHasher]:
    hasher = await open_password_hasher("bcrypt", cost=COST, workers=2)
    yield hasher
    await hasher.close()


@pytest.fixture(scope="module")
async def libxcrypt_hasher() -> AsyncIterator[PasswordHasher]:
    hasher = await open_password_hasher("libxcrypt", cost=COST, workers=1)
    yield hasher
    await hasher.close()


async def test_factory_picks_the_implementation(
    bcrypt_hasher: PasswordHasher, libxcrypt_hasher: PasswordHasher
) -> None:
    assert isinstance(bcrypt_hasher, BcryptThreadPoolHasher)
    assert isinstance(libxcrypt_hasher, LibxcryptProcessPoolHasher)


@pytest.mark.parametrize("password", ["secret-password", "pässwörd-ünïcødé-🔑", "a" * 72])
async def test_hashes_are_2b_with_the_configured_cost_and_interchangeable(
    bcrypt_hasher: PasswordHasher, libxcrypt_hasher: PasswordHasher, password: str
) -> None:
    from_bcrypt = await bcrypt_hasher.hash(password)
    from_libxcrypt = await libxcrypt_hasher.hash(password)
    for hashed in (from_bcrypt, from_libxcrypt):
        assert hashed.startswith(f"$2b${COST:02d}$")
        assert len(hashed) == 60
        for hasher in (bcrypt_hasher, libxcrypt_hasher):
            assert await hasher.verify(password, hashed)
            assert not await hasher.verify(password + "x", hashed)
    assert bcrypt.checkpw(password.encode(), from_libxcrypt.encode())


async def test_existing_cake_hashes_verify(
    bcrypt_hasher: PasswordHasher, libxcrypt_hasher: PasswordHasher
) -> None:
    # A $2b$ cost-10 hash as Node's bcrypt writes it for the Cake System.
    cake_hash = bcrypt.hashpw(b"cake-user-password", b"$2b$10$abcdefghijklmnopqrstuu").decode()
    for hasher in (bcrypt_hasher, libxcrypt_hasher):
        assert await hasher.verify("cake-user-password", cake_hash)


@pytest.mark.parametrize(
    ("password", "stored"),
    [
        ("secret", "not-a-hash"),
        ("secret", ""),
        ("secret", "$2b$04$short"),
        ("secret", "abJnggxhB/yWI"),  # DES crypt: libxcrypt would accept it as a "salt"
        ("a" * 73, "$2b$04$abcdefghijklmnopqrstuuLGhRZoT1Ag1cD8XQhM9mHLb0ZqVEDzG"),
        ("nul\x00byte", "$2b$04$abcdefghijklmnopqrstuuLGhRZoT1Ag1cD8XQhM9mHLb0ZqVEDzG"),
    ],
)
async def test_unusable_input_never_matches(
    bcrypt_hasher: PasswordHasher, libxcrypt_hasher: PasswordHasher, password: str, stored: str
) -> None:
    for hasher in (bcrypt_hasher, libxcrypt_hasher):
        assert await hasher.verify(password, stored) is False
