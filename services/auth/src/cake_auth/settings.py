"""Auth service configuration, read from ``CAKE_AUTH_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from cake_common.settings import OutboxSettings, ServiceSettings
from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict


class AuthSettings(ServiceSettings, OutboxSettings):
    model_config = SettingsConfigDict(env_prefix="CAKE_AUTH_")

    service_name: str = "auth"
    grpc_port: int = 17051

    # Cost 10 is Cake's (and the floor for production); tests and benchmarks of the plumbing
    # may lower it, bcrypt itself accepts 4..31.
    bcrypt_cost: int = Field(default=10, ge=4, le=31, description="bcrypt cost (log2 rounds)")
    password_hasher: Literal["lanes", "libxcrypt", "bcrypt"] = Field(
        default="lanes",
        description="lanes: cake_bcrypt, each hashing thread computing up to "
        "password_hash_lanes hashes at once (about 3x the checks per core under load); "
        "libxcrypt: crypt_rn of libcrypt.so.1 through ctypes; bcrypt: pyca bcrypt; those two "
        "one hash per thread",
    )
    password_hash_lanes: int = Field(
        default=4,
        ge=1,
        le=8,
        description="Hashes each hashing thread computes at once with the lanes hasher "
        "(interleaved: 4 cost about 1.3x the time of 1)",
    )
    password_hasher_fallback: Literal["bcrypt", "none"] = Field(
        default="bcrypt",
        description="When password_hasher is libxcrypt and libcrypt.so.1 cannot be loaded: "
        "bcrypt = use pyca bcrypt (logged as a warning); none = refuse to start",
    )
    password_hash_workers: int | None = Field(
        default=None,
        ge=1,
        description="Hashing threads of the whole service (run by the supervisor for all "
        "its worker processes, or shared out over them, at least one each, when "
        "password_hash_shared is off); default: CPU count",
    )
    password_hash_partner_wait_ms: float = Field(
        default=60,
        ge=0,
        le=1000,
        description="Longest a password check that would run alone on an idle hashing "
        "thread waits for a second one to share it with (a pair costs about 1.15x one), "
        "only while recent arrivals say the next is due within that time; 0: never waits",
    )
    password_hash_shared: bool = Field(
        default=True,
        description="With workers > 1 and the lanes hasher: the supervisor runs the hashing "
        "threads for every worker (Unix socket <worker_socket_dir>/auth-hasher.sock), so "
        "checks arriving at different workers share lanes; false: each worker runs its share",
    )
    hash_queue_max_waiting: int | None = Field(
        default=None,
        ge=0,
        description="Logins/registrations that may wait for a hashing thread, in total over "
        "the worker processes (each admits its share, rounded up); beyond that they are "
        "refused at once (UNAVAILABLE, retry-after); default: not fixed, what the hashing "
        "threads are measured to finish within hash_queue_max_wait_seconds",
    )
    hash_queue_max_wait_seconds: float = Field(
        default=1.5,
        gt=0,
        description="Longest a login/registration should wait for a hashing thread: each "
        "worker admits a call while the calls ahead of it take its threads at most that long "
        "(measured: hashes per second while all are busy), so a near-ceiling burst queues; "
        "beyond that it refuses at once (UNAVAILABLE, retry-after); unused when "
        "hash_queue_max_waiting fixes the count",
    )
    workers: int = Field(
        default=1,
        ge=1,
        description="Server processes (cake_common.workers): 1 serves from this process; "
        "more start a supervisor and that many workers, each on its own Unix socket "
        "<worker_socket_dir>/auth-<i>.sock (the gateway's endpoints), worker 0 also on "
        "grpc_port. The local stack runs one per CPU; in Kubernetes replicas scale instead",
    )
    worker_socket_dir: Path | None = Field(
        default=None, description="Directory of the workers' sockets; required when workers > 1"
    )

    access_token_ttl_seconds: int = Field(
        default=900, gt=0, description="Access-token lifetime (short: sessions refresh)"
    )
    service_token_ttl_seconds: int = Field(
        default=300,
        gt=0,
        description="Lifetime of a service account's access token (client credentials); "
        "at most ACCESS_TOKEN_TTL_SECONDS, so a revocation mark outlives every token",
    )
    public_url: str = Field(
        default="http://127.0.0.1:8080",
        pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$",
        description="Where clients reach Cake (the gateway): the discovery document's "
        "jwks_uri and token_endpoint are under it",
    )
    session_lifetime_seconds: int = Field(
        default=604800,
        gt=0,
        description="Absolute session lifetime from login; refreshing never extends it",
    )
    jwt_private_key_file: Path | None = Field(
        default=None, description="EC P-256 private key (PKCS8 PEM) that signs access tokens"
    )

    login_max_failures: int = Field(
        default=5,
        ge=1,
        description="Failed logins of one account before each further attempt must wait",
    )
    login_failure_window_seconds: int = Field(
        default=900, ge=1, description="Failures are forgotten this long after the last one"
    )
    login_delay_base_seconds: float = Field(
        default=1, gt=0, description="First delay; it doubles with every further failure"
    )
    login_delay_max_seconds: float = Field(
        default=300, gt=0, description="Longest delay imposed on one account (no lock-out)"
    )
    login_ip_max_failures: int = Field(
        default=20, ge=1, description="Failed logins from one client IP before delays start"
    )
    login_ip_delay_max_seconds: float = Field(
        default=900, gt=0, description="Longest delay imposed on one client IP"
    )
    redis_key_prefix: str = Field(
        default="cake:auth:",
        pattern=r"^[A-Za-z0-9:_.-]+$",
        description="Namespace of every Redis key (profiles, login failures, denylist)",
    )
    profile_cache_ttl_seconds: int = Field(
        default=300, ge=0, description="Profile cache lifetime in Redis; 0 disables the cache"
    )
    profile_memory_seconds: float = Field(
        default=30,
        ge=0,
        le=3600,
        description=(
            "How long a process answers a profile from its own memory before reading Redis"
            " again (a change drops the copy in every process at once); 0: always Redis"
        ),
    )

    @model_validator(mode="after")
    def _service_tokens_outlived_by_revocations(self) -> AuthSettings:
        if self.service_token_ttl_seconds > self.access_token_ttl_seconds:
            raise ValueError(
                "SERVICE_TOKEN_TTL_SECONDS must not exceed ACCESS_TOKEN_TTL_SECONDS (revocation "
                "marks of service accounts live as long as a user's access token)"
            )
        return self

    @model_validator(mode="after")
    def _workers_have_sockets(self) -> Self:
        if self.workers > 1 and self.worker_socket_dir is None:
            raise ValueError("CAKE_AUTH_WORKER_SOCKET_DIR is required when CAKE_AUTH_WORKERS > 1")
        return self
