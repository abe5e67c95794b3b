"""The hash queue's admission control: its bound, its counters and its retry-after."""

from __future__ import annotations

import pytest
from cake_auth.metrics import AuthMetrics
from cake_auth.service.admission import SERVER_BUSY_REASON, HashAdmission
from cake_common.errors import Unavailable
from prometheus_client import CollectorRegistry


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def counted(registry: CollectorRegistry, operation: str, result: str) -> float:
    labels = {"operation": operation, "result": result}
    return registry.get_sample_value("cake_auth_hash_admission_total", labels) or 0.0


async def test_admits_workers_plus_waiting_then_refuses_until_a_place_frees() -> None:
    registry = CollectorRegistry()
    admission = HashAdmission(workers=2, max_waiting=1, metrics=AuthMetrics(registry))
    assert admission.limit == 3
    async with admission.admitted("login"), admission.admitted("login"):
        async with admission.admitted("register"):
            assert admission.in_flight == 3
            assert registry.get_sample_value("cake_auth_hash_in_flight") == 3
            with pytest.raises(Unavailable) as refused:
                async with admission.admitted("login"):
                    pytest.fail("admitted beyond the bound")
            assert refused.value.reason == SERVER_BUSY_REASON
        async with admission.admitted("login"):  # the registration's place
            assert admission.in_flight == 3
    assert admission.in_flight == 0
    assert registry.get_sample_value("cake_auth_hash_in_flight") == 0
    assert counted(registry, "login", "admitted") == 3
    assert counted(registry, "register", "admitted") == 1
    assert counted(registry, "login", "refused") == 1


async def test_an_error_in_the_block_frees_its_place() -> None:
    admission = HashAdmission(workers=1, max_waiting=0, metrics=AuthMetrics(CollectorRegistry()))
    with pytest.raises(RuntimeError):
        async with admission.admitted("login"):
            raise RuntimeError("hash failed")
    async with admission.admitted("login"):
        assert admission.in_flight == 1


async def test_retry_after_follows_the_recent_time_from_admission_to_the_end_of_the_hash() -> None:
    clock = Clock()
    admission = HashAdmission(
        workers=1,
        max_waiting=0,
        metrics=AuthMetrics(CollectorRegistry()),
        initial_hold_seconds=0.05,
        clock=clock,
    )
    assert admission.retry_after_seconds() == 1  # never less than a second
    for _ in range(40):  # a queue that now takes 3.5 s from admission to the hash's end
        async with admission.admitted("login"):
            clock.now += 3.5
    assert admission.retry_after_seconds() == 4
    async with admission.admitted("login"):
        with pytest.raises(Unavailable) as refused:
            async with admission.admitted("login"):
                pass
    assert refused.value.retry_after_seconds == 4
    assert refused.value.metadata == {"retry_after_seconds": "4"}


@pytest.mark.parametrize(("workers", "max_waiting"), [(0, 1), (1, -1)])
def test_nonsense_bounds_are_refused(workers: int, max_waiting: int) -> None:
    with pytest.raises(ValueError, match="workers"):
        HashAdmission(
            workers=workers, max_waiting=max_waiting, metrics=AuthMetrics(CollectorRegistry())
        )
