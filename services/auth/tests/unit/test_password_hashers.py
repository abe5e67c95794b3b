"""Both bcrypt adapters produce ``$2b$`` hashes, accept ``$2a$``/``$2b$`` ones and agree with
pyca bcrypt both ways, off the event loop; the libxcrypt one falls back only as configured."""

from __future__ import annotations

from collections.abc import AsyncIterator

import bcrypt
import pytest
from cake_auth.adapters.password_hashers import (
    BcryptThreadPoolHasher,
    LibcryptUnavailableError,
    LibxcryptThreadPoolHasher,
    ThreadPoolHasher,
    open_password_hasher,
)
from structlog.testing import capture_logs

COST = 4
PASSWORDS = ["secret-password", "pässwörd-ünïcødé-🔑", "a" * 72]


@pytest.fixture(scope="module")
async def bcrypt_hasher() -> AsyncIterator[ThreadPoolHasher]:
    hasher = await open_password_hasher("bcrypt", cost=COST, workers=2)
    yield hasher
    await hasher.close()


@pytest.fixture(scope="module")
async def libxcrypt_hasher() -> AsyncIterator[ThreadPoolHasher]:
    hasher = await open_password_hasher("libxcrypt", cost=COST, workers=2, fallback="none")
    yield hasher
    await hasher.close()


async def test_factory_picks_the_implementation(
    bcrypt_hasher: ThreadPoolHasher, libxcrypt_hasher: ThreadPoolHasher
) -> None:
    assert isinstance(bcrypt_hasher, BcryptThreadPoolHasher)
    assert isinstance(libxcrypt_hasher, LibxcryptThreadPoolHasher)
    assert (bcrypt_hasher.kind, libxcrypt_hasher.kind) == ("bcrypt", "libxcrypt")


@pytest.mark.parametrize("password", PASSWORDS)
async def test_hashes_are_2b_with_the_configured_cost_and_interchangeable(
    bcrypt_hasher: ThreadPoolHasher, libxcrypt_hasher: ThreadPoolHasher, password: str
) -> None:
    from_bcrypt = await bcrypt_hasher.hash(password)
    from_libxcrypt = await libxcrypt_hasher.hash(password)
    assert from_bcrypt != from_libxcrypt  # each has its own random salt
    for hashed in (from_bcrypt, from_libxcrypt):
        assert hashed.startswith(f"$2b${COST:02d}$")
        assert len(hashed) == 60
        for hasher in (bcrypt_hasher, libxcrypt_hasher):
            assert await hasher.verify(password, hashed)
            assert not await hasher.verify(password + "x", hashed)
            assert not await hasher.verify(password[:-1], hashed)


@pytest.mark.parametrize("password", PASSWORDS)
async def test_libxcrypt_agrees_with_pyca_bcrypt_both_ways(
    libxcrypt_hasher: ThreadPoolHasher, password: str
) -> None:
    # libxcrypt's hash, checked by pyca bcrypt itself (not through our adapter)...
    from_libxcrypt = await libxcrypt_hasher.hash(password)
    assert bcrypt.checkpw(password.encode(), from_libxcrypt.encode())
    assert not bcrypt.checkpw(b"wrong-" + password.encode()[:60], from_libxcrypt.encode())
    # ...and pyca bcrypt's hash, with both prefixes, checked by libxcrypt.
    for prefix in (b"2b", b"2a"):
        from_pyca = bcrypt.hashpw(password.encode(), bcrypt.gensalt(COST, prefix=prefix))
        assert from_pyca.startswith(b"$" + prefix + b"$")
        assert await libxcrypt_hasher.verify(password, from_pyca.decode())
        assert not await libxcrypt_hasher.verify("wrong-" + password, from_pyca.decode())


async def test_existing_cake_hashes_verify(
    bcrypt_hasher: ThreadPoolHasher, libxcrypt_hasher: ThreadPoolHasher
) -> None:
    # A $2b$ cost-10 hash as Node's bcrypt writes it for the Cake System, and a $2a$ one as
    # older bcrypt libraries write them (the same digest under the other prefix).
    cake_hash = bcrypt.hashpw(b"cake-user-password", b"$2b$10$abcdefghijklmnopqrstuu").decode()
    old_hash = "$2a$" + cake_hash.removeprefix("$2b$")
    for hasher in (bcrypt_hasher, libxcrypt_hasher):
        for stored in (cake_hash, old_hash):
            assert await hasher.verify("cake-user-password", stored)
            assert not await hasher.verify("cake-user-passwore", stored)


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
    bcrypt_hasher: ThreadPoolHasher, libxcrypt_hasher: ThreadPoolHasher, password: str, stored: str
) -> None:
    for hasher in (bcrypt_hasher, libxcrypt_hasher):
        assert await hasher.verify(password, stored) is False


async def test_over_long_password_is_not_hashed(libxcrypt_hasher: ThreadPoolHasher) -> None:
    with pytest.raises(ValueError, match="72 bytes"):
        await libxcrypt_hasher.hash("a" * 73)


async def test_missing_libcrypt_falls_back_to_pyca_bcrypt_with_a_warning() -> None:
    with capture_logs() as logs:
        hasher = await open_password_hasher(
            "libxcrypt", cost=COST, workers=1, libcrypt_soname="libcrypt-missing.so.9"
        )
    try:
        assert isinstance(hasher, BcryptThreadPoolHasher)
        assert await hasher.verify("pw", bcrypt.hashpw(b"pw", bcrypt.gensalt(COST)).decode())
    finally:
        await hasher.close()
    warning = next(log for log in logs if log["log_level"] == "warning")
    assert warning["configured_hasher"] == "libxcrypt"
    assert warning["hasher_fallback"] == "bcrypt"
    assert "libcrypt-missing.so.9" in warning["reason"]
    ready = next(log for log in logs if log["event"] == "bcrypt hasher ready")
    assert ready["hasher"] == "bcrypt"


async def test_missing_libcrypt_without_fallback_refuses_to_start() -> None:
    with pytest.raises(LibcryptUnavailableError, match="libcrypt1"):
        await open_password_hasher(
            "libxcrypt",
            cost=COST,
            workers=1,
            fallback="none",
            libcrypt_soname="libcrypt-missing.so.9",
        )
