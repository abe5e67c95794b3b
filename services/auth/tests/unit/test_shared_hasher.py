"""The supervisor's hashing engines served to worker processes over a Unix socket: answers
agree with pyca bcrypt, also from several processes hammering at once; only the service's
user may connect; what bcrypt refuses is refused; a lost connection fails the checks in
flight with UNAVAILABLE and the next check reconnects; a missing server fails at once."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import struct
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import bcrypt
import pytest
from cake_auth.adapters.password_hashers import LanesHasher
from cake_auth.adapters.shared_hasher import (
    HashingUnavailable,
    HashServer,
    RemoteLanesHasher,
    hasher_socket_path,
)

COST = 4


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return hasher_socket_path(tmp_path, "auth")


@pytest.fixture
async def server(path: Path) -> AsyncIterator[HashServer]:
    engines = LanesHasher(COST, 2, 3, partner_wait_seconds=0.01)
    hash_server = HashServer(engines, path)
    await hash_server.start()
    yield hash_server
    await hash_server.close()
    await engines.close()


@pytest.fixture
async def remote(path: Path, server: HashServer) -> AsyncIterator[RemoteLanesHasher]:
    client = RemoteLanesHasher(path, COST, concurrency=3)
    await client.connect()
    yield client
    await client.close()


async def test_answers_agree_with_pyca_bcrypt(remote: RemoteLanesHasher, path: Path) -> None:
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    for password in ("secret-password", "pässwörd-🔑", "a" * 72):
        stored = await remote.hash(password)
        assert stored.startswith(f"$2b${COST:02d}$")
        assert bcrypt.checkpw(password.encode(), stored.encode())
        from_pyca = bcrypt.hashpw(password.encode(), bcrypt.gensalt(COST)).decode()
        assert await remote.verify(password, from_pyca)
        assert not await remote.verify("wrong-" + password, from_pyca)
    assert not await remote.verify("x" * 73, from_pyca)  # too long: never matches
    assert not await remote.verify("secret", "not a bcrypt hash")


# A worker process: 80 concurrent checks, right and wrong passwords mixed, through its own
# connection; prints whether each answer was right.
_WORKER = """
import asyncio, json, sys
from pathlib import Path
import bcrypt
from cake_auth.adapters.shared_hasher import RemoteLanesHasher

async def hammer(path, offset):
    client = RemoteLanesHasher(Path(path), 4, concurrency=3)
    stored = {i: bcrypt.hashpw(f"p{i}".encode(), bcrypt.gensalt(4)).decode() for i in range(8)}
    try:
        answers = await asyncio.gather(
            *(client.verify(f"p{(i * 3 + offset) % 8}", stored[i % 8]) for i in range(80))
        )
    finally:
        await client.close()
    return [answer is ((i * 3 + offset) % 8 == i % 8) for i, answer in enumerate(answers)]

print(json.dumps(asyncio.run(hammer(sys.argv[1], int(sys.argv[2])))))
"""


@pytest.mark.usefixtures("server")
async def test_three_worker_processes_at_once_each_get_their_own_answers(path: Path) -> None:
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _WORKER, str(path), str(offset), stdout=asyncio.subprocess.PIPE
        )
        for offset in range(3)
    ]
    outputs = await asyncio.gather(*(process.communicate() for process in processes))
    assert [process.returncode for process in processes] == [0, 0, 0]
    results = [json.loads(stdout.splitlines()[-1]) for stdout, _ in outputs]
    assert all(len(result) == 80 and all(result) for result in results)


@pytest.mark.usefixtures("server")
async def test_what_bcrypt_refuses_is_refused(path: Path) -> None:
    reader, writer = await asyncio.open_unix_connection(str(path))
    request = struct.Struct("!IBB16s")
    writer.write(request.pack(7, 40, 3, bytes(16)) + b"ab\x00")  # cost 40
    number, status, digest = struct.unpack("!IB23s", await reader.readexactly(28))
    assert (number, status, digest) == (7, 1, bytes(23))
    writer.close()
    remote = RemoteLanesHasher(path, COST, concurrency=1)
    with pytest.raises(ValueError, match=r"cost of 4\.\.31"):
        await remote.digest(b"ab\x00", bytes(16), 3)
    await remote.close()


async def test_a_lost_connection_fails_checks_in_flight_and_the_next_reconnects(
    path: Path,
) -> None:
    engines = LanesHasher(COST, 1, 2)
    slow = LanesHasher(13, 1, 2)  # ~0.4 s a check: still in flight when the server goes
    first = HashServer(slow, path)
    await first.start()
    remote = RemoteLanesHasher(path, 13, concurrency=2)
    try:
        stored = await slow.hash("pw")
        in_flight = asyncio.ensure_future(remote.verify("pw", stored))
        await asyncio.sleep(0.1)
        await first.close()
        with pytest.raises(HashingUnavailable) as refused:
            await in_flight
        assert refused.value.retry_after_seconds == 1
        second = HashServer(engines, path)
        await second.start()
        try:
            # The same client reconnects on its next check.
            assert await remote.verify("pw", stored)
        finally:
            await second.close()
    finally:
        await remote.close()
        await engines.close()
        await slow.close()


async def test_a_missing_server_fails_at_once(path: Path) -> None:
    remote = RemoteLanesHasher(path, COST, concurrency=1)
    with pytest.raises(HashingUnavailable):
        await remote.connect()
    # A file nobody listens on (a dead supervisor's leftover) is the same.
    leftover = socket.socket(socket.AF_UNIX)
    leftover.bind(str(path))
    leftover.close()
    with pytest.raises(HashingUnavailable):
        await remote.hash("pw")
    await remote.close()
