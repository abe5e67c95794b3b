"""The hash queue's admission control: its bound (fixed, or measured from the hashing threads'
throughput), its counters and its retry-after."""

from __future__ import annotations

from collections import deque
from contextlib import AbstractAsyncContextManager

import pytest
from cake_auth.metrics import AuthMetrics
from cake_auth.service.admission import SERVER_BUSY_REASON, HashAdmission, HashThroughput
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


async def saturate(admission: HashAdmission, clock: Clock, *, hashes: int, seconds: float) -> None:
    """``hashes`` calls through one thread, each ``seconds`` long, in arrival order, the next
    one always admitted before the current one ends (the thread never idles)."""
    in_flight: deque[AbstractAsyncContextManager[None]] = deque()

    async def arrive() -> None:
        call = admission.hashing()
        await call.__aenter__()
        in_flight.append(call)

    async def finish() -> None:
        clock.now += seconds
        await in_flight.popleft().__aexit__(None, None, None)

    await arrive()
    for _ in range(hashes - 1):
        await arrive()
        await finish()
    await finish()


async def test_the_queue_holds_what_the_threads_are_measured_to_finish_in_the_max_wait() -> None:
    clock = Clock()
    registry = CollectorRegistry()
    admission = HashAdmission(
        workers=1,
        max_wait_seconds=1.0,
        initial_hash_seconds=0.1,
        metrics=AuthMetrics(registry),
        clock=clock,
    )
    # Before any measurement: the hash timed at start, 10 a second, 10 may wait.
    assert admission.limit == 11
    assert registry.get_sample_value("cake_auth_hash_admission_limit") == 11

    # The box turns out five times faster: 50 hashes a second, the queue grows to 50.
    await saturate(admission, clock, hashes=100, seconds=0.02)
    assert admission.hashes_per_second == pytest.approx(50, rel=0.05)
    assert admission.limit == 51
    assert registry.get_sample_value("cake_auth_hash_admission_limit") == 51

    # Then other load takes most of the CPU: 4 a second, the queue shrinks to 4 (and later
    # calls are refused well before they could wait beyond the max wait).
    await saturate(admission, clock, hashes=100, seconds=0.25)
    assert admission.hashes_per_second == pytest.approx(4, rel=0.05)
    assert admission.limit == 5


def test_idle_time_between_calls_does_not_count_as_slowness() -> None:
    throughput = HashThroughput(workers=2, initial_hash_seconds=0.1)
    assert throughput.interval_seconds == pytest.approx(0.05)
    now = 0.0
    for _ in range(200):  # one call at a time, 10 s apart: never more than one thread busy
        throughput.started(now, 1)
        now += 0.1
        throughput.completed(now, 0)
        now += 10
    assert throughput.interval_seconds == pytest.approx(0.05)


def test_two_busy_threads_finish_twice_as_often_as_one() -> None:
    throughput = HashThroughput(workers=2, initial_hash_seconds=1.0)
    now = 0.0
    throughput.started(now, 1)
    throughput.started(now, 2)
    for _ in range(300):  # two 0.2 s hashes running side by side, always refilled at once
        now += 0.1
        throughput.completed(now, 1)
        throughput.started(now, 2)
    assert throughput.per_second == pytest.approx(10, rel=0.01)
    assert throughput.waiting_for(1.5) == 15
    assert throughput.waiting_for(0.01) == 1  # never less than one waiting


async def test_retry_after_is_the_time_the_calls_in_flight_need() -> None:
    clock = Clock()
    admission = HashAdmission(
        workers=1,
        max_waiting=1,
        metrics=AuthMetrics(CollectorRegistry()),
        initial_hash_seconds=0.05,
        clock=clock,
    )
    assert admission.retry_after_seconds() == 1  # never less than a second
    await saturate(admission, clock, hashes=60, seconds=3.5)  # hashes now take 3.5 s each
    async with admission.admitted("login"), admission.admitted("login"):
        with pytest.raises(Unavailable) as refused:
            async with admission.admitted("login"):
                pass
    # Two calls in flight, 3.5 s each through the one thread.
    assert refused.value.retry_after_seconds == 7
    assert refused.value.metadata == {"retry_after_seconds": "7"}


@pytest.mark.parametrize(
    ("workers", "max_waiting", "max_wait_seconds", "message"),
    [(0, 1, 1.0, "workers"), (1, -1, 1.0, "workers"), (1, None, 0.0, "max_wait_seconds")],
)
def test_nonsense_bounds_are_refused(
    workers: int, max_waiting: int | None, max_wait_seconds: float, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        HashAdmission(
            workers=workers,
            max_waiting=max_waiting,
            max_wait_seconds=max_wait_seconds,
            metrics=AuthMetrics(CollectorRegistry()),
        )


async def test_the_time_an_admitted_call_spends_before_its_hash_is_not_the_threads() -> None:
    # Admitted logins read the account and count the attempt before their hash: with one
    # thread, a call admitted while another is hashed is not a busy thread yet. Only the
    # hashes' own time measures the threads (0.1 s each here, 1 s of lookups around them).
    clock = Clock()
    registry = CollectorRegistry()
    admission = HashAdmission(
        workers=1, initial_hash_seconds=0.5, metrics=AuthMetrics(registry), clock=clock
    )
    for _ in range(100):
        async with admission.admitted("login"), admission.admitted("login"):
            clock.now += 1.0  # both look their accounts up, no hash handed over yet
            async with admission.hashing():
                clock.now += 0.1
            async with admission.hashing():
                clock.now += 0.1
    assert admission.hashes_per_second == pytest.approx(10, rel=0.05)
    # The threads were busy 0.2 s of every 1.2 s: that is what the counter says.
    assert registry.get_sample_value("cake_auth_hash_saturated_seconds_total") == pytest.approx(
        20.0
    )


async def test_the_metered_hasher_hashes_through_the_admissions_meter() -> None:
    clock = Clock()
    registry = CollectorRegistry()
    admission = HashAdmission(workers=1, metrics=AuthMetrics(registry), clock=clock)

    class SlowHasher:
        async def hash(self, password: str) -> str:
            clock.now += 0.25
            return f"hashed:{password}"

        async def verify(self, password: str, password_hash: str) -> bool:
            clock.now += 0.25
            return password_hash == f"hashed:{password}"

        async def close(self) -> None:
            pass

    hasher = admission.metered(SlowHasher())
    assert await hasher.verify("pw", await hasher.hash("pw"))
    assert not await hasher.verify("other", "hashed:pw")
    assert registry.get_sample_value("cake_auth_hash_saturated_seconds_total") == pytest.approx(
        0.75
    )
