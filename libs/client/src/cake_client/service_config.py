"""The gRPC service config every Cake channel carries: deadlines and retries per method.

gRPC applies it inside the channel (https://github.com/grpc/grpc/blob/master/doc/service_config.md),
so every call gets a deadline and reads are retried on UNAVAILABLE with backoff without any
code around the call. Writes are not retried here: a top-up is retried by the caller with the
same ``idempotency-key``, which makes the retry safe (``Topup`` documents this).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

#: Methods without effects: retried on UNAVAILABLE (a restarting pod, a refused stream).
READS: Mapping[str, Sequence[str]] = {
    "cake.auth.v1.AuthService": ("GetProfile", "GetJwks"),
    "cake.promotions.v1.PromotionsService": (
        "ListCampaigns",
        "GetCampaign",
        "GetEligibility",
        "ListMyPromotions",
        "ListMyVouchers",
        "ValidateVoucher",
    ),
    "cake.events.v1.EventAdminService": ("GetQueueStats", "ListDeadLetters", "ListAuditEvents"),
    "cake.events.v1.SystemHealthService": ("GetSystemHealth",),
}

#: Methods that wait on slow work (a password hash, the bank): a longer deadline.
SLOW: Mapping[str, Sequence[str]] = {
    "cake.auth.v1.AuthService": ("Login", "Register"),
    "cake.promotions.v1.PromotionsService": ("Topup",),
}

#: Every service the client speaks to: methods not named above get the default deadline.
SERVICES: Sequence[str] = (
    "cake.auth.v1.AuthService",
    "cake.promotions.v1.PromotionsService",
    "cake.events.v1.EventAdminService",
    "cake.events.v1.SystemHealthService",
)


def _seconds(value: float) -> str:
    return f"{value:.3f}s"


def service_config(
    *,
    default_timeout: float = 10.0,
    read_timeout: float = 5.0,
    slow_timeout: float = 30.0,
    read_attempts: int = 4,
) -> dict[str, Any]:
    """The service config as a dict (``json.dumps`` it into ``grpc.service_config``).

    The most specific entry wins in gRPC: a method's own entry before its service's."""
    if not 1 <= read_attempts <= 5:
        raise ValueError(f"read_attempts must be 1 to 5 (gRPC's limit), got {read_attempts}")
    method_config: list[dict[str, Any]] = [
        {
            "name": [{"service": service} for service in SERVICES],
            "timeout": _seconds(default_timeout),
        }
    ]
    method_config.append(
        {
            "name": [{"service": s, "method": m} for s, methods in READS.items() for m in methods],
            "timeout": _seconds(read_timeout),
            **(
                {
                    "retryPolicy": {
                        "maxAttempts": read_attempts,
                        "initialBackoff": "0.1s",
                        "maxBackoff": "1s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    }
                }
                if read_attempts > 1
                else {}
            ),
        }
    )
    method_config.append(
        {
            "name": [{"service": s, "method": m} for s, methods in SLOW.items() for m in methods],
            "timeout": _seconds(slow_timeout),
        }
    )
    return {"methodConfig": method_config}


def service_config_json(**kwargs: Any) -> str:
    return json.dumps(service_config(**kwargs))
