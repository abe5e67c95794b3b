"""The environment variables other parts of Cake rely on (stack, k8s, README)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cake_auth.settings import AuthSettings
from pydantic import ValidationError

URL = "postgresql+psycopg://cake_auth:secret@127.0.0.1:5432/cake_auth"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer shell with the stack's auth environment exported must not leak in."""
    for name in list(os.environ):
        if name.startswith("CAKE_AUTH_"):
            monkeypatch.delenv(name)


def test_auth_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "CAKE_AUTH_DATABASE_URL": URL,
        "CAKE_AUTH_JWT_PRIVATE_KEY_FILE": "/keys/jwt-signing-key.pem",
        "CAKE_AUTH_JWKS_FILE": "/keys/jwks.json",
        "CAKE_AUTH_ACCESS_TOKEN_TTL_SECONDS": "3600",
        "CAKE_AUTH_BCRYPT_COST": "12",
        "CAKE_AUTH_PASSWORD_HASHER": "bcrypt",
        "CAKE_AUTH_PASSWORD_HASHER_FALLBACK": "none",
        "CAKE_AUTH_LOGIN_MAX_FAILURES": "5",
        "CAKE_AUTH_LOGIN_FAILURE_WINDOW_SECONDS": "60",
        "CAKE_AUTH_PROFILE_CACHE_TTL_SECONDS": "30",
    }.items():
        monkeypatch.setenv(name, value)
    settings = AuthSettings()
    assert settings.jwt_private_key_file == Path("/keys/jwt-signing-key.pem")
    assert settings.jwks_file == Path("/keys/jwks.json")
    assert (settings.access_token_ttl_seconds, settings.bcrypt_cost) == (3600, 12)
    assert (settings.password_hasher, settings.password_hasher_fallback) == ("bcrypt", "none")
    assert (settings.login_max_failures, settings.login_failure_window_seconds) == (5, 60)
    assert settings.profile_cache_ttl_seconds == 30


def test_defaults_are_cakes() -> None:
    settings = AuthSettings(database_url=URL)
    assert settings.bcrypt_cost == 10
    assert (settings.password_hasher, settings.password_hasher_fallback) == ("lanes", "bcrypt")
    assert settings.password_hash_lanes == 4
    assert settings.access_token_ttl_seconds == 900  # 15 min; sessions refresh
    assert settings.session_lifetime_seconds == 604800  # Cake's 7 days, now per session
    assert (settings.login_max_failures, settings.login_failure_window_seconds) == (5, 900)
    assert (settings.login_delay_base_seconds, settings.login_delay_max_seconds) == (1, 300)
    assert settings.profile_cache_ttl_seconds == 300
    assert settings.profile_memory_seconds == 30
    assert (settings.password_hash_partner_wait_ms, settings.password_hash_shared) == (60, True)
    assert settings.redis_key_prefix == "cake:auth:"


@pytest.mark.parametrize(
    "overrides",
    [
        {"bcrypt_cost": 3},
        {"bcrypt_cost": 32},
        {"password_hasher": "md5"},
        {"password_hasher_fallback": "md5"},
        {"password_hash_lanes": 0},
        {"password_hash_lanes": 9},
        {"redis_key_prefix": "a b"},
        {"profile_memory_seconds": -1},
        {"profile_memory_seconds": 3601},
        {"password_hash_partner_wait_ms": -1},
        {"password_hash_partner_wait_ms": 1001},
        {"password_hash_shared": "sometimes"},
    ],
)
def test_bad_values_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        AuthSettings(database_url=URL, **overrides)


def test_several_workers_need_a_socket_directory() -> None:
    with pytest.raises(ValidationError, match="CAKE_AUTH_WORKER_SOCKET_DIR"):
        AuthSettings(database_url=URL, workers=2)
    assert (
        AuthSettings(database_url=URL, workers=2, worker_socket_dir=Path("/run/auth")).workers == 2
    )


@pytest.mark.parametrize(
    ("workers", "threads", "waiting", "per_process"),
    [
        # 2 CPUs, 2 processes: one hashing thread and 4 waiting places each = the totals of one.
        # Not fixed: each worker measures its own threads (None stays None).
        (2, 2, None, (1, None)),
        (1, 2, None, (2, None)),
        (2, 2, 10, (1, 5)),
        # Rounded up: every process hashes and admits at least its share.
        (3, 4, 9, (2, 3)),
        (4, 2, 0, (1, 0)),
    ],
)
def test_each_worker_gets_its_share_of_the_hashing_threads_and_the_queue(
    workers: int, threads: int, waiting: int | None, per_process: tuple[int, int | None]
) -> None:
    from cake_auth.bootstrap import worker_settings

    settings = AuthSettings(
        database_url=URL,
        workers=workers,
        worker_socket_dir=Path("/run/auth"),
        password_hash_workers=threads,
        hash_queue_max_waiting=waiting,
    )
    share = worker_settings(settings)
    assert (share.password_hash_workers, share.hash_queue_max_waiting) == per_process


def test_worker_zero_also_listens_on_the_service_port() -> None:
    from cake_auth.bootstrap import worker_addresses

    settings = AuthSettings(
        database_url=URL, workers=2, worker_socket_dir=Path("/run/auth"), grpc_port=7051
    )
    assert worker_addresses(settings, 0) == ["unix:/run/auth/auth-0.sock", "127.0.0.1:7051"]
    assert worker_addresses(settings, 1) == ["unix:/run/auth/auth-1.sock"]


def test_the_supervisor_shares_the_engines_only_with_several_lanes_workers() -> None:
    from cake_auth.bootstrap import shared_hasher_path

    run = Path("/run/auth")
    shared = AuthSettings(database_url=URL, workers=2, worker_socket_dir=run)
    assert shared_hasher_path(shared) == run / "auth-hasher.sock"
    for settings in (
        AuthSettings(database_url=URL),
        AuthSettings(
            database_url=URL, workers=2, worker_socket_dir=run, password_hash_shared=False
        ),
        AuthSettings(database_url=URL, workers=2, worker_socket_dir=run, password_hasher="bcrypt"),
    ):
        assert shared_hasher_path(settings) is None
