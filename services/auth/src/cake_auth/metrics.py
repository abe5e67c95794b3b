"""Prometheus metrics of the auth service (exposed on ``metrics_port`` by the common runtime)."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge


class AuthMetrics:
    """The service's counters, registered on ``registry`` (tests pass a fresh one each)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.logins = Counter(
            "cake_auth_logins",
            "Login attempts by result (success, invalid_credentials, throttled)",
            ["result"],
            registry=registry,
        )
        self.hash_admission = Counter(
            "cake_auth_hash_admission",
            "Logins and registrations at the password-hash queue, by operation and result "
            "(admitted, refused: the queue was full, UNAVAILABLE with retry-after)",
            ["operation", "result"],
            registry=registry,
        )
        self.hash_in_flight = Gauge(
            "cake_auth_hash_in_flight",
            "Logins and registrations admitted to the password-hash queue and not yet done",
            registry=registry,
            # Several worker processes: the sum over the live ones.
            multiprocess_mode="livesum",
        )
        self.hash_admission_limit = Gauge(
            "cake_auth_hash_admission_limit",
            "Hash-bound calls admitted at most right now: the hashing threads plus what they "
            "are measured to finish within the queue's maximum wait (or the fixed bound)",
            registry=registry,
            # Several worker processes: each admits its own, the service the sum.
            multiprocess_mode="livesum",
        )
        self.hash_saturated_seconds = Counter(
            "cake_auth_hash_saturated_seconds",
            "Seconds during which every hashing thread had a hash to run (the threads' busy "
            "time when saturated: under overload it should grow as fast as the clock)",
            registry=registry,
        )
        self.first_logins = Counter(
            "cake_auth_first_logins",
            "First logins, each recorded as a first-login outbox event",
            registry=registry,
        )
        self.registrations = Counter(
            "cake_auth_registrations",
            "Registration attempts that reached the database, by result (created, conflict)",
            ["result"],
            registry=registry,
        )
        self.profile_cache = Counter(
            "cake_auth_profile_cache_lookups",
            "Profile cache lookups by result (memory: the process's own copy; hit, miss,"
            " bypassed: Redis)",
            ["result"],
            registry=registry,
        )
        self.refreshes = Counter(
            "cake_auth_refreshes",
            "Token refreshes by result (rotated, invalid, session_ended, reused)",
            ["result"],
            registry=registry,
        )
        self.redis_bypassed = Counter(
            "cake_auth_redis_bypassed",
            "Redis operations that failed or were skipped while Redis was failing",
            ["operation"],
            registry=registry,
        )
        self.service_tokens = Counter(
            "cake_auth_service_tokens",
            "Client credentials token requests by result (issued, or the RFC 6749 error: "
            "invalid_client, invalid_scope, invalid_request, unsupported_grant_type)",
            ["result"],
            registry=registry,
        )
