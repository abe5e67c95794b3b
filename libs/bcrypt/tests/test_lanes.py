"""cake_bcrypt computes standard bcrypt, lane by lane, whatever else runs beside it.

The references are pyca bcrypt (OpenBSD's code) and libxcrypt (Debian's libcrypt.so.1,
through ctypes): about a thousand random passwords and salts, every prefix, every length up to
72 bytes, 8-bit bytes; lanes that start, run and finish at different times with different
costs; and the engine under concurrent submitters.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import pathlib
import random
import subprocess
import sys
import threading

import bcrypt
import pytest
from cake_bcrypt import (
    MAX_LANES,
    BcryptEngine,
    EngineClosedError,
    Setting,
    bcrypt_key,
    encode_hash,
    parse_hash,
)
from cake_bcrypt._lanes import Lanes

LIB = pathlib.Path(__file__).resolve().parents[1]


def _random_password(rng: random.Random, *, ascii_only: bool = False) -> bytes:
    length = rng.choice([0, 1, 2, 3, 4, 7, 8, 15, 16, 31, 55, 70, 71, 72, rng.randrange(73)])
    top = 127 if ascii_only else 256
    return bytes(rng.randrange(1, top) for _ in range(length))


def _lanes_hash(lanes: Lanes, jobs: list[tuple[bytes, Setting]]) -> list[str]:
    """Run ``jobs`` through ``lanes`` (at most its capacity at once) as an engine would."""
    results: dict[int, str] = {}
    waiting = list(enumerate(jobs))
    running: dict[int, tuple[int, Setting]] = {}
    while waiting or running:
        for slot in range(lanes.capacity):
            if slot not in running and waiting:
                index, (password, setting) = waiting.pop(0)
                lanes.start(slot, bcrypt_key(password), setting.salt, setting.cost)
                running[slot] = (index, setting)
        for slot in lanes.run(3):
            index, setting = running.pop(slot)
            results[index] = encode_hash(setting, lanes.take(slot))
    return [results[i] for i in range(len(jobs))]


@pytest.mark.parametrize("capacity", [1, 2, 3, 4, 8])
def test_lanes_agree_with_pyca_bcrypt_on_random_passwords(capacity: int) -> None:
    rng = random.Random(capacity)
    jobs = []
    for _ in range(120):
        password = _random_password(rng)
        prefix = rng.choice(["$2a$", "$2b$", "$2y$"])
        cost = rng.choice([4, 4, 5])
        setting = Setting(prefix, cost, rng.randbytes(16))
        jobs.append((password, setting))
    ours = _lanes_hash(Lanes(capacity), jobs)
    for (password, setting), mine in zip(jobs, ours, strict=True):
        reference = bcrypt.hashpw(password, encode_hash(setting, bytes(23))[:29].encode())
        assert mine == reference.decode(), (password, setting)


def test_lanes_agree_with_libxcrypt() -> None:
    library = ctypes.CDLL("libcrypt.so.1")
    library.crypt_r.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p]
    library.crypt_r.restype = ctypes.c_char_p
    data = ctypes.create_string_buffer(32768)
    rng = random.Random(7)
    # libxcrypt's $2a$ differs from OpenBSD's for some 8-bit passwords on purpose (its
    # "sign extension bug" countermeasure): compare $2a$ on ASCII only; $2b$/$2y$ on any.
    jobs = []
    for _ in range(300):
        prefix = rng.choice(["$2a$", "$2b$", "$2y$"])
        password = _random_password(rng, ascii_only=prefix == "$2a$")
        jobs.append((password, Setting(prefix, 4, rng.randbytes(16))))
    ours = _lanes_hash(Lanes(4), jobs)
    for (password, setting), mine in zip(jobs, ours, strict=True):
        reference = library.crypt_r(password, mine[:29].encode(), data)
        assert mine == reference.decode(), (password, setting)


def test_a_published_vector() -> None:
    # OpenBSD's regression vector (also in pyca bcrypt's tests): "U*U", cost 5.
    expected = "$2a$05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW"
    setting = parse_hash(expected)
    assert _lanes_hash(Lanes(1), [(b"U*U", setting)]) == [expected]


def test_lanes_of_different_costs_joining_at_different_times() -> None:
    """A lane's result does not depend on who runs beside it, when it joined or its cost."""
    rng = random.Random(11)
    lanes = Lanes(4)
    pending = [
        (_random_password(rng), Setting("$2b$", rng.choice([4, 5, 6]), rng.randbytes(16)))
        for _ in range(40)
    ]
    expected = [
        bcrypt.hashpw(p, encode_hash(s, bytes(23))[:29].encode()).decode() for p, s in pending
    ]
    running: dict[int, int] = {}
    got: dict[int, str] = {}
    next_job = 0
    while next_job < len(pending) or running:
        # Start at most one job per step (so lanes join mid-way), a random number of rounds.
        free = [slot for slot in range(4) if slot not in running]
        if free and next_job < len(pending) and rng.random() < 0.7:
            password, setting = pending[next_job]
            lanes.start(free[0], bcrypt_key(password), setting.salt, setting.cost)
            running[free[0]] = next_job
            next_job += 1
        assert lanes.running == len(running)
        for slot in lanes.run(rng.randrange(1, 20)):
            index = running.pop(slot)
            got[index] = encode_hash(pending[index][1], lanes.take(slot))
    assert [got[i] for i in range(len(pending))] == expected


def test_lanes_refuse_misuse() -> None:
    lanes = Lanes(2)
    with pytest.raises(ValueError, match="capacity"):
        Lanes(0)
    with pytest.raises(ValueError, match="capacity"):
        Lanes(MAX_LANES + 1)
    with pytest.raises(IndexError):
        lanes.start(2, b"pw\x00", bytes(16), 4)
    with pytest.raises(ValueError, match="key"):
        lanes.start(0, b"", bytes(16), 4)
    with pytest.raises(ValueError, match="key"):
        lanes.start(0, b"x" * 73, bytes(16), 4)
    with pytest.raises(ValueError, match="salt"):
        lanes.start(0, b"pw\x00", bytes(15), 4)
    with pytest.raises(ValueError, match="cost"):
        lanes.start(0, b"pw\x00", bytes(16), 3)
    with pytest.raises(ValueError, match="cost"):
        lanes.start(0, b"pw\x00", bytes(16), 32)
    with pytest.raises(ValueError, match="max_rounds"):
        lanes.run(0)
    lanes.start(0, b"pw\x00", bytes(16), 4)
    with pytest.raises(ValueError, match="busy"):
        lanes.start(0, b"pw\x00", bytes(16), 4)
    with pytest.raises(ValueError, match="not completed"):
        lanes.take(0)
    assert lanes.run(1000) == [0]
    assert len(lanes.take(0)) == 23
    with pytest.raises(ValueError, match="not completed"):
        lanes.take(0)  # taken once only
    assert lanes.run(5) == []


def test_parse_hash_refuses_what_is_not_a_bcrypt_hash() -> None:
    good = "$2b$10$" + "a" * 21 + "." + "b" * 31
    assert parse_hash(good).cost == 10
    for bad in [
        "",
        "$2x$10$" + good[7:],  # crypt_blowfish's buggy variant: never accepted
        "$1$10$" + good[7:],
        good[:-1],
        "$2b$1x$" + good[7:],
        "$2b$03$" + good[7:],
        "$2b$32$" + good[7:],
        "$2b$10#" + good[7:],
        "$2b$10$" + "!" * 22 + "b" * 31,
        "$2b$10$" + "é" * 22 + "b" * 31,
    ]:
        with pytest.raises(ValueError):
            parse_hash(bad)
    with pytest.raises(ValueError, match="NUL"):
        bcrypt_key(b"a\x00b")
    assert bcrypt_key(b"x" * 80) == b"x" * 72
    assert bcrypt_key(b"abc") == b"abc\x00"


def test_engine_hammered_by_concurrent_submitters() -> None:
    """8 threads submit 25 hashes each to one 4-lane engine: each gets its own, right result."""
    engine = BcryptEngine(lanes=4, rounds_per_step=4)
    rng = random.Random(3)
    salts = [rng.randbytes(16) for _ in range(200)]
    results: dict[int, str] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def submitter(first: int) -> None:
        try:
            barrier.wait()
            futures = {}
            for index in range(first, first + 25):
                setting = Setting("$2b$", 4 + index % 2, salts[index])
                key = bcrypt_key(b"user-%d" % index)
                futures[index] = (setting, engine.submit(key, setting.salt, setting.cost))
            for index, (setting, future) in futures.items():
                results[index] = encode_hash(setting, future.result(timeout=60))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=submitter, args=(25 * i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    engine.close()
    assert errors == []
    assert len(results) == 200
    for index, mine in results.items():
        assert bcrypt.checkpw(b"user-%d" % index, mine.encode()), index


def test_engine_skips_cancelled_work_and_drains_on_close() -> None:
    engine = BcryptEngine(lanes=1, rounds_per_step=1)
    first = engine.submit(b"a\x00", bytes(16), 8)  # 256 rounds: the next ones wait behind it
    cancelled = engine.submit(b"b\x00", bytes(16), 4)
    kept = engine.submit(b"c\x00", bytes(16), 4)
    assert cancelled.cancel()
    engine.close(timeout=60)  # everything submitted before close finishes
    assert len(first.result(timeout=0)) == 23
    assert len(kept.result(timeout=0)) == 23
    assert cancelled.cancelled()
    with pytest.raises(EngineClosedError):
        engine.submit(b"d\x00", bytes(16), 4)
    with pytest.raises(ValueError):
        BcryptEngine(lanes=1, rounds_per_step=0)


def test_engine_refuses_bad_arguments_without_harm() -> None:
    engine = BcryptEngine(lanes=2)
    try:
        for key, salt, cost in [(b"", bytes(16), 4), (b"k", bytes(8), 4), (b"k", bytes(16), 40)]:
            with pytest.raises(ValueError):
                engine.submit(key, salt, cost)
        assert len(engine.submit(b"k\x00", bytes(16), 4).result(timeout=30)) == 23
    finally:
        engine.close()


def test_many_engines_in_parallel_threads_agree() -> None:
    """Lanes objects in different threads share nothing (the GIL is released meanwhile)."""
    engines = [BcryptEngine(lanes=3, name=f"bcrypt-{i}") for i in range(3)]
    try:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            salts = [os.urandom(16) for _ in range(30)]
            futures = [
                pool.submit(
                    lambda i=i: engines[i % 3].submit(b"p%d\x00" % i, salts[i], 5).result(60)
                )
                for i in range(30)
            ]
            for i, future in enumerate(futures):
                mine = encode_hash(Setting("$2b$", 5, salts[i]), future.result())
                assert bcrypt.checkpw(b"p%d" % i, mine.encode())
    finally:
        for engine in engines:
            engine.close()


def test_blowfish_table_is_pi_and_fresh() -> None:
    result = subprocess.run(
        [sys.executable, str(LIB / "gen_blowfish_init.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_a_failing_engine_fails_its_callers_instead_of_leaving_them_waiting() -> None:
    """If the lanes ever raise (a bug), every caller, running or waiting, gets an error and
    the engine refuses new work, rather than futures that never complete."""

    class BrokenLanes:
        capacity = 1
        running = 0

        def start(self, slot: int, key: bytes, salt: bytes, cost: int) -> None:
            pass

        def run(self, max_rounds: int) -> list[int]:
            raise RuntimeError("broken on purpose")

        def take(self, slot: int) -> bytes:
            raise AssertionError("never reached")

    engine = BcryptEngine(lanes=1, rounds_per_step=1)
    engine.close()  # the real thread is done; run the loop again on a broken set of lanes
    engine._lanes = BrokenLanes()  # type: ignore[assignment]
    engine._closed = False
    first = engine.submit(b"a\x00", bytes(16), 4)
    waiting = engine.submit(b"b\x00", bytes(16), 4)
    with pytest.raises(RuntimeError, match="broken on purpose"):  # the thread's end
        engine._work()
    for future in (first, waiting):
        with pytest.raises(EngineClosedError, match="broken on purpose"):
            future.result(timeout=0)
    with pytest.raises(EngineClosedError):
        engine.submit(b"c\x00", bytes(16), 4)
