"""The three bcrypt adapters produce ``$2b$`` hashes, accept ``$2a$``/``$2b$`` ones and agree
with pyca bcrypt both ways, off the event loop; the libxcrypt one falls back only as
configured; the lanes one answers each of many concurrent calls with its own result."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import bcrypt
import pytest
from cake_auth.adapters.password_hashers import (
    BcryptThreadPoolHasher,
    LanesHasher,
    LibcryptUnavailableError,
    Libxcrypt,
    LibxcryptThreadPoolHasher,
    ThreadPoolHasher,
    open_password_hasher,
)
from cake_auth.service.ports import PasswordHasher
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


@pytest.fixture(scope="module")
async def lanes_hasher() -> AsyncIterator[LanesHasher]:
    hasher = await open_password_hasher("lanes", cost=COST, workers=2, lanes=3)
    assert isinstance(hasher, LanesHasher)
    yield hasher
    await hasher.close()


@pytest.fixture(scope="module")
def hashers(
    bcrypt_hasher: ThreadPoolHasher,
    libxcrypt_hasher: ThreadPoolHasher,
    lanes_hasher: LanesHasher,
) -> tuple[PasswordHasher, ...]:
    return (bcrypt_hasher, libxcrypt_hasher, lanes_hasher)


async def test_factory_picks_the_implementation(
    bcrypt_hasher: ThreadPoolHasher, libxcrypt_hasher: ThreadPoolHasher, lanes_hasher: LanesHasher
) -> None:
    assert isinstance(bcrypt_hasher, BcryptThreadPoolHasher)
    assert isinstance(libxcrypt_hasher, LibxcryptThreadPoolHasher)
    assert (bcrypt_hasher.kind, libxcrypt_hasher.kind, lanes_hasher.kind) == (
        "bcrypt",
        "libxcrypt",
        "lanes",
    )
    # What the admission in front of them counts as computed at once.
    assert (bcrypt_hasher.concurrency, libxcrypt_hasher.concurrency) == (2, 2)
    assert lanes_hasher.concurrency == 2 * 3


@pytest.mark.parametrize("password", PASSWORDS)
async def test_hashes_are_2b_with_the_configured_cost_and_interchangeable(
    hashers: tuple[PasswordHasher, ...], password: str
) -> None:
    made = [await hasher.hash(password) for hasher in hashers]
    assert len(set(made)) == len(made)  # each has its own random salt
    for hashed in made:
        assert hashed.startswith(f"$2b${COST:02d}$")
        assert len(hashed) == 60
        for hasher in hashers:
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


@pytest.mark.parametrize("password", PASSWORDS)
async def test_lanes_agree_with_pyca_bcrypt_both_ways(
    lanes_hasher: LanesHasher, password: str
) -> None:
    from_lanes = await lanes_hasher.hash(password)
    assert bcrypt.checkpw(password.encode(), from_lanes.encode())
    for prefix in (b"2b", b"2a"):
        from_pyca = bcrypt.hashpw(password.encode(), bcrypt.gensalt(COST, prefix=prefix))
        assert await lanes_hasher.verify(password, from_pyca.decode())
        assert not await lanes_hasher.verify("wrong-" + password, from_pyca.decode())
    # $2y$ (PHP's name for $2b$) too.
    from_pyca_2y = "$2y$" + bcrypt.hashpw(password.encode(), bcrypt.gensalt(COST)).decode()[4:]
    assert await lanes_hasher.verify(password, from_pyca_2y)


async def test_2a_with_8_bit_passwords_keeps_libxcrypts_answer(lanes_hasher: LanesHasher) -> None:
    """libxcrypt's $2a$ differs from OpenBSD's on some 8-bit passwords (a countermeasure to an
    old bug); the lanes hasher hands those to libxcrypt, so every stored hash keeps the answer
    the libxcrypt hasher gave (the default before it)."""
    library = Libxcrypt()
    rng = random.Random(5)
    for _ in range(20):
        password = "".join(chr(rng.randrange(0x80, 0x250)) for _ in range(rng.randrange(1, 20)))
        if len(password.encode()) > 72:
            continue
        stored = library.crypt(password, "$2a$04$" + "abcdefghijklmnopqrstuu")
        assert stored is not None
        assert await lanes_hasher.verify(password, stored) == library.verify(password, stored)
        assert await lanes_hasher.verify(password, stored)


async def test_lanes_answer_each_of_many_concurrent_calls_with_its_own_result(
    lanes_hasher: LanesHasher,
) -> None:
    """60 concurrent checks on 2 engines of 3 lanes, right and wrong passwords mixed."""
    stored = {f"user-{i}": await lanes_hasher.hash(f"user-{i}") for i in range(12)}
    calls = [(f"user-{i % 12}", f"user-{(i * 7) % 12}") for i in range(60)]
    answers = await asyncio.gather(
        *(lanes_hasher.verify(password, stored[owner]) for password, owner in calls)
    )
    assert answers == [password == owner for password, owner in calls]
    assert any(answers) and not all(answers)


async def test_existing_cake_hashes_verify(hashers: tuple[PasswordHasher, ...]) -> None:
    # A $2b$ cost-10 hash as Node's bcrypt writes it for the Cake System, and a $2a$ one as
    # older bcrypt libraries write them (the same digest under the other prefix).
    cake_hash = bcrypt.hashpw(b"cake-user-password", b"$2b$10$abcdefghijklmnopqrstuu").decode()
    old_hash = "$2a$" + cake_hash.removeprefix("$2b$")
    for hasher in hashers:
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
        ("secret", "$2b$04$abcdefghijklmnopqrstuuLGhRZoT1Ag1cD8XQhM9mHLb0ZqVEDzé"),
        ("secret", "$2x$04$abcdefghijklmnopqrstuuLGhRZoT1Ag1cD8XQhM9mHLb0ZqVEDzG"),
        ("secret", "$2b$99$abcdefghijklmnopqrstuuLGhRZoT1Ag1cD8XQhM9mHLb0ZqVEDzG"),
    ],
)
async def test_unusable_input_never_matches(
    hashers: tuple[PasswordHasher, ...], password: str, stored: str
) -> None:
    for hasher in hashers:
        assert await hasher.verify(password, stored) is False


async def test_over_long_password_is_not_hashed(
    libxcrypt_hasher: ThreadPoolHasher, lanes_hasher: LanesHasher
) -> None:
    for hasher in (libxcrypt_hasher, lanes_hasher):
        with pytest.raises(ValueError, match="72 bytes"):
            await hasher.hash("a" * 73)


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
