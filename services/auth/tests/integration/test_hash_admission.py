"""Admission control at the hash queue, with real concurrent calls on a real auth server: the
calls beyond ``workers x lanes + max_waiting`` (what the hasher computes at once and what may
wait) are refused at once (UNAVAILABLE, ``retry-after``),
none waits into its deadline, and a refused login does not count against the account; by
default the bound is measured (what the threads finish within the max wait), and under an
open-model overload of twice the ceiling the thread stays busy (its busy seconds, counted by
the server, against the wall clock), the admitted wait about the max wait and the rest are
refused at once."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from cake.auth.v1 import auth_pb2

pytestmark = pytest.mark.integration

PASSWORD = "correct horse battery"
WORKERS = 1
LANES = 2  # the lanes hasher (the default): each thread computes LANES hashes at once
MAX_WAITING = 2
BURST = 20
DEADLINE_SECONDS = 60  # far beyond any wait: a refusal must not come from the deadline


@pytest.fixture(scope="module")
async def slow_auth(start_auth_server: Any) -> Any:
    # Cost 12 (≈ 0.2-0.4 s a check): the burst's calls all arrive while the first are hashed.
    return await start_auth_server(
        bcrypt_cost=12,
        password_hash_workers=WORKERS,
        password_hash_lanes=LANES,
        hash_queue_max_waiting=MAX_WAITING,
        login_max_failures=MAX_WAITING + WORKERS * LANES + 3,
    )


def retry_after(error: grpc.aio.AioRpcError) -> int:
    headers = dict(error.trailing_metadata() or ())
    return int(headers["retry-after"])


async def burst(calls: list[Any]) -> tuple[list[Any], list[grpc.aio.AioRpcError]]:
    """Run the calls at once: (answers, errors)."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    errors = [result for result in results if isinstance(result, grpc.aio.AioRpcError)]
    answers = [result for result in results if not isinstance(result, BaseException)]
    assert len(answers) + len(errors) == len(calls), results
    return answers, errors


def assert_refused_as_busy(server: Any, errors: list[grpc.aio.AioRpcError]) -> None:
    for error in errors:
        rich = server.rich_error(error)
        assert rich.code == grpc.StatusCode.UNAVAILABLE, rich
        assert rich.reason == "SERVER_BUSY"
        assert retry_after(error) >= 1
        assert rich.metadata == {"retry_after_seconds": str(retry_after(error))}


async def test_a_login_burst_beyond_the_queue_is_refused_at_once_and_not_counted(
    slow_auth: Any,
) -> None:
    user = (await slow_auth.register()).user
    wrong = auth_pb2.LoginRequest(account=user.username, password="wrong password")
    answers, errors = await burst(
        [slow_auth.stub.Login(wrong, timeout=DEADLINE_SECONDS) for _ in range(BURST)]
    )
    assert answers == []
    refused = [e for e in errors if e.code() == grpc.StatusCode.UNAVAILABLE]
    checked = [e for e in errors if e.code() == grpc.StatusCode.UNAUTHENTICATED]
    assert len(refused) + len(checked) == BURST, [e.code() for e in errors]
    assert len(checked) >= WORKERS * LANES + MAX_WAITING
    assert len(refused) >= 1
    assert_refused_as_busy(slow_auth, refused)
    assert slow_auth.counter(
        "cake_auth_hash_admission_total", operation="login", result="refused"
    ) == len(refused)
    assert slow_auth.counter(
        "cake_auth_hash_admission_total", operation="login", result="admitted"
    ) == len(checked)
    assert slow_auth.counter("cake_auth_logins_total", result="invalid_credentials") == len(checked)

    # Only the checked attempts counted against the account (BURST would throttle it), and
    # the queue is empty again: the right password logs in.
    response = await slow_auth.stub.Login(
        auth_pb2.LoginRequest(account=user.username, password=PASSWORD),
        timeout=DEADLINE_SECONDS,
    )
    assert response.user.id == user.id
    assert slow_auth.counter("cake_auth_hash_in_flight") == 0


async def test_a_registration_burst_beyond_the_queue_is_refused_at_once(slow_auth: Any) -> None:
    registrations = [slow_auth.registration() for _ in range(BURST // 2)]
    answers, errors = await burst(
        [slow_auth.stub.Register(request, timeout=DEADLINE_SECONDS) for request in registrations]
    )
    assert len(answers) >= WORKERS * LANES + MAX_WAITING
    assert len(errors) >= 1
    assert_refused_as_busy(slow_auth, errors)
    # A refused registration created nothing: it can simply be sent again.
    created = {answer.user.username for answer in answers}
    refused = [r for r in registrations if r.username not in created]
    assert len(refused) == len(errors)
    again = await slow_auth.stub.Register(refused[0], timeout=DEADLINE_SECONDS)
    assert again.user.username == refused[0].username


# -- the measured bound, under a real open-model overload ------------------------------------

# One lane: the measured bound as the service computes it, on the default hasher, with one
# hash at a time (the bursts above run two lanes). With several lanes an admitted call's own
# hash takes that many completion intervals and lanes finish in bunches, so the p95 bound
# below would need a wider margin than the one it checks.
MEASURED_LANES = 1
MAX_WAIT_SECONDS = 1.0
OVERLOAD_SECONDS = 6.0
OVERLOAD_FACTOR = 2.0  # offered: twice what the server is measured to serve


@pytest.fixture(scope="module")
async def measured_auth(start_auth_server: Any) -> Any:
    # One hashing thread of two lanes at cost 11 (≈ 0.1-0.2 s a check here): a ceiling of a
    # few logins a second, which this test's client saturates without competing much for
    # the CPU.
    return await start_auth_server(
        bcrypt_cost=11,
        password_hash_workers=1,
        password_hash_lanes=MEASURED_LANES,
        hash_queue_max_waiting=None,  # measured, as in the service's default
        hash_queue_max_wait_seconds=MAX_WAIT_SECONDS,
        # Every login of the overload names one account: the throttle, which holds a place
        # for each attempt in flight, must not be what refuses them.
        login_max_failures=1000,
    )


async def timed_login(server: Any, account: str) -> tuple[float, grpc.StatusCode]:
    request = auth_pb2.LoginRequest(account=account, password=PASSWORD)
    started = asyncio.get_running_loop().time()
    try:
        await server.stub.Login(request, timeout=DEADLINE_SECONDS)
        code = grpc.StatusCode.OK
    except grpc.aio.AioRpcError as error:
        code = error.code()
    return asyncio.get_running_loop().time() - started, code


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


async def test_under_twice_the_ceiling_the_bound_follows_what_the_threads_serve(
    measured_auth: Any,
) -> None:
    user = (await measured_auth.register()).user
    account = user.username
    loop = asyncio.get_running_loop()

    # The ceiling, closed-loop: two callers per lane always waiting on the thread for 3 s.
    ceiling_until = loop.time() + 3.0
    served = 0

    async def caller() -> None:
        nonlocal served
        while loop.time() < ceiling_until:
            _, code = await timed_login(measured_auth, account)
            assert code == grpc.StatusCode.OK
            served += 1

    started = loop.time()
    await asyncio.gather(*(caller() for _ in range(2 * MEASURED_LANES)))
    ceiling = served / (loop.time() - started)

    # What the admission measured sizes the queue: its hashes a second times the max wait.
    limit = measured_auth.counter("cake_auth_hash_admission_limit")
    assert 0.5 * ceiling * MAX_WAIT_SECONDS - 1 <= limit - 1 <= 2 * ceiling * MAX_WAIT_SECONDS + 1

    # Then an open-model overload: arrivals at twice the ceiling, whatever the answers.
    rate = OVERLOAD_FACTOR * ceiling
    calls: list[asyncio.Task[tuple[float, grpc.StatusCode]]] = []
    saturated_before = measured_auth.counter("cake_auth_hash_saturated_seconds_total")
    started = loop.time()
    for index in range(int(rate * OVERLOAD_SECONDS)):
        await asyncio.sleep(max(0.0, started + index / rate - loop.time()))
        calls.append(asyncio.create_task(timed_login(measured_auth, account)))
    results = await asyncio.gather(*calls)
    elapsed = loop.time() - started
    saturated = measured_auth.counter("cake_auth_hash_saturated_seconds_total") - saturated_before

    codes = {code for _, code in results}
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes  # no deadline hit
    accepted = [seconds for seconds, code in results if code == grpc.StatusCode.OK]
    refused = [seconds for seconds, code in results if code == grpc.StatusCode.UNAVAILABLE]
    assert refused, "twice the ceiling and nothing refused"
    # The thread stayed busy: the refusals left it no idle gap, so goodput is the ceiling of
    # these very seconds. Judged by the server's own busy time, not by the accepted count
    # against the ceiling of the seconds before (on a shared box the two differ: the other
    # load changes, this test's client shares the server's event loop). From the first
    # arrival to the last answer: the first hash starts at once, the queue drains at the end.
    assert saturated >= 0.85 * elapsed, (saturated, elapsed, len(accepted))
    # The admitted waited about the max wait (plus their own check and a few more: the
    # estimate is a moving average), not into their deadline; the rest learnt at once. A
    # check's time is the slower of the ceiling's and what the thread took per admitted call
    # during the overload itself (its busy seconds ÷ the calls it served): other load on a
    # shared box slows the hashes after the admission measured them, and a queue sized for
    # the faster checks then takes longer by the same factor. Admitting everything would
    # still be caught: the queue would grow for the whole overload (several seconds of wait).
    check_seconds = max(1 / ceiling, saturated / len(accepted))
    slowdown = check_seconds * ceiling
    own_check = MEASURED_LANES * check_seconds  # a lane's hash spans that many intervals
    assert p95(accepted) < MAX_WAIT_SECONDS * slowdown + own_check + 2 * check_seconds, (
        p95(accepted),
        ceiling,
        check_seconds,
    )
    assert p95(refused) < 0.25, p95(refused)
