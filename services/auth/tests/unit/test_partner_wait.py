"""The lanes hasher's wait for a partner, on real engines: a lone check that is due a partner
waits for it and both start together on one engine; without one it goes alone after the
wait; a caller that goes away while waiting leaves nothing behind; and many concurrent
checks with waits on every engine all get their own right answer."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import bcrypt
import pytest
from cake_auth.adapters.password_hashers import LanesHasher
from cake_bcrypt import EngineClosedError

COST = 4


class _Clock:
    """Arrival times the test chooses (the policy smooths the gaps between them)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> _Clock:
    return _Clock()


@pytest.fixture
async def hasher(clock: _Clock) -> AsyncIterator[LanesHasher]:
    lanes = LanesHasher(COST, 2, 4, partner_wait_seconds=0.3, clock=clock)
    yield lanes
    await lanes.close()


async def _known_rate(hasher: LanesHasher, clock: _Clock) -> str:
    """Two checks 10 ms apart (by the clock): the next lone one is due a partner."""
    stored = await hasher.hash("warm-up")
    clock.now += 0.01
    assert await hasher.verify("warm-up", stored)  # the gap is now known: it waited alone
    clock.now += 0.01
    return stored


async def test_a_lone_check_goes_alone_after_the_wait(hasher: LanesHasher, clock: _Clock) -> None:
    stored = await _known_rate(hasher, clock)
    assert hasher.partner_waits == {"paired": 0, "alone": 1}
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await hasher.verify("warm-up", stored)
    assert loop.time() - started >= 0.3  # held for the whole wait: nobody came
    assert hasher.partner_waits == {"paired": 0, "alone": 2}


async def test_a_waiting_check_starts_with_the_next_on_one_engine(
    hasher: LanesHasher, clock: _Clock
) -> None:
    stored = await _known_rate(hasher, clock)
    first = asyncio.ensure_future(hasher.verify("warm-up", stored))
    await asyncio.sleep(0.01)
    assert not first.done()  # waiting for a partner
    clock.now += 0.01
    second = asyncio.ensure_future(hasher.verify("wrong", stored))
    await asyncio.sleep(0)
    # Both were submitted to the same engine, the other one stays idle.
    assert sorted(hasher.in_flight(engine) for engine in (0, 1)) == [0, 2]
    assert await first is True
    assert await second is False
    assert hasher.partner_waits["paired"] == 1
    assert [hasher.in_flight(engine) for engine in (0, 1)] == [0, 0]


async def test_a_caller_gone_while_waiting_leaves_nothing_behind(
    hasher: LanesHasher, clock: _Clock
) -> None:
    stored = await _known_rate(hasher, clock)
    alone_before = hasher.partner_waits["alone"]
    waiting = asyncio.ensure_future(hasher.verify("warm-up", stored))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await asyncio.sleep(0.35)  # past the cancelled one's wait: its timer must not fire
    assert hasher.partner_waits["alone"] == alone_before
    assert [hasher.in_flight(engine) for engine in (0, 1)] == [0, 0]
    # The next check is not paired with the ghost: it waits on its own, and is answered.
    clock.now += 0.01
    assert await hasher.verify("warm-up", stored)
    assert hasher.partner_waits["alone"] == alone_before + 1
    assert hasher.partner_waits["paired"] == 0


async def test_many_concurrent_checks_with_waits_all_get_their_own_answer(
    clock: _Clock,
) -> None:
    """300 checks and hashes arriving at random moments over two engines of two lanes, with
    a wait long enough to be taken often: each answer is its own, pyca bcrypt agrees, and
    nothing stays counted in flight."""
    hasher = LanesHasher(COST, 2, 2, partner_wait_seconds=0.02, clock=clock)
    rng = random.Random(16)
    stored = {
        f"user-{i}": bcrypt.hashpw(f"user-{i}".encode(), bcrypt.gensalt(COST)).decode()
        for i in range(10)
    }

    async def one(index: int) -> tuple[str, object]:
        await asyncio.sleep(rng.random() * 0.3)
        clock.now += 0.005
        if index % 5 == 0:
            return ("hash", await hasher.hash(f"new-{index}"))
        owner, password = f"user-{index % 10}", f"user-{(index * 3) % 10}"
        return ("verify", (await hasher.verify(password, stored[owner]), password == owner))

    try:
        results = await asyncio.gather(*(one(index) for index in range(300)))
    finally:
        await hasher.close()
    for index, (kind, value) in enumerate(results):
        if kind == "hash":
            assert isinstance(value, str)
            assert bcrypt.checkpw(f"new-{index}".encode(), value.encode())
        else:
            assert isinstance(value, tuple)
            assert value[0] is value[1]
    assert [hasher.in_flight(engine) for engine in (0, 1)] == [0, 0]
    assert hasher.partner_waits["paired"] > 0


async def test_a_check_waiting_when_the_engines_close_fails_instead_of_hanging(
    hasher: LanesHasher, clock: _Clock
) -> None:
    stored = await _known_rate(hasher, clock)
    waiting = asyncio.ensure_future(hasher.verify("warm-up", stored))
    await asyncio.sleep(0.01)
    await hasher.close()
    with pytest.raises(EngineClosedError):
        await asyncio.wait_for(waiting, 2)
