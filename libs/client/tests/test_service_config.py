from __future__ import annotations

import pytest
from cake.auth.v1 import auth_pb2  # noqa: F401 - registers the descriptors
from cake.events.v1 import admin_pb2, health_pb2  # noqa: F401
from cake.promotions.v1 import promotions_pb2  # noqa: F401
from cake_client.service_config import READS, SERVICES, SLOW, service_config
from google.protobuf import descriptor_pool


def test_every_named_service_and_method_exists_in_the_contracts() -> None:
    pool = descriptor_pool.Default()
    for service in SERVICES:
        pool.FindServiceByName(service)
    for table in (READS, SLOW):
        for service, methods in table.items():
            assert service in SERVICES
            names = {method.name for method in pool.FindServiceByName(service).methods}
            assert set(methods) <= names, set(methods) - names


def test_reads_are_retried_on_unavailable_and_writes_are_not() -> None:
    config = service_config()
    read_entry, slow_entry = config["methodConfig"][1], config["methodConfig"][2]
    assert read_entry["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert read_entry["timeout"] == "5.000s"
    assert {"service": "cake.promotions.v1.PromotionsService", "method": "Topup"} in slow_entry[
        "name"
    ]
    assert "retryPolicy" not in slow_entry
    assert "retryPolicy" not in config["methodConfig"][0]


def test_one_attempt_means_no_retry_policy_and_gRPC_limits_are_checked() -> None:
    assert "retryPolicy" not in service_config(read_attempts=1)["methodConfig"][1]
    with pytest.raises(ValueError, match="read_attempts must be 1 to 5"):
        service_config(read_attempts=6)
