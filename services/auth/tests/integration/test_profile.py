"""Profile read and update through gRPC, with the Redis cache in front of PostgreSQL."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import grpc
import pytest
import redis.asyncio
from cake.auth.v1 import auth_pb2
from cake_auth.adapters.profile_cache import RedisProfileCache
from cake_auth.adapters.redis_guard import RedisGuard
from cake_auth.domain.users import Role
from cake_auth.metrics import AuthMetrics
from cake_auth.user_proto import user_from_proto
from prometheus_client import CollectorRegistry

pytestmark = pytest.mark.integration

GET = auth_pb2.GetProfileRequest()


async def test_profile_is_the_callers_and_comes_from_the_cache_the_second_time(
    auth: Any, redis_client: redis.asyncio.Redis
) -> None:
    registered = await auth.register()
    caller = auth.bearer(registered.access_token)

    def cached() -> float:  # answered by Redis or, later than a second after iat, memory
        return sum(
            auth.counter("cake_auth_profile_cache_lookups_total", result=result)
            for result in ("hit", "memory")
        )

    hits = cached()
    first = await auth.stub.GetProfile(GET, metadata=caller)
    second = await auth.stub.GetProfile(GET, metadata=caller)
    assert first.user == second.user == registered.user
    assert cached() == hits + 1

    key = f"{auth.settings.redis_key_prefix}profile:{registered.user.id}"
    entry = await redis_client.hgetall(key)
    assert entry[b"version"] == b"1"
    assert entry[b"user"] == registered.user.SerializeToString()
    assert 0 < await redis_client.ttl(key) <= auth.settings.profile_cache_ttl_seconds


async def test_update_changes_present_fields_and_replaces_the_cached_copy(auth: Any) -> None:
    registered = await auth.register()
    caller = auth.bearer(registered.access_token)
    await auth.stub.GetProfile(GET, metadata=caller)  # cached now

    new_phone = auth.registration().phone
    updated = (
        await auth.stub.UpdateProfile(
            auth_pb2.UpdateProfileRequest(
                fullname=" Grace Hopper ",
                email="Grace." + registered.user.email.upper(),
                phone=new_phone,
                birthday="1906-12-09",
            ),
            metadata=caller,
        )
    ).user
    assert updated.fullname == "Grace Hopper"
    assert updated.email == "grace." + registered.user.email
    assert updated.phone == new_phone.replace(" ", "")
    assert updated.birthday == "1906-12-09"
    assert (updated.id, updated.username) == (registered.user.id, registered.user.username)
    assert updated.updated_at.ToDatetime() > registered.user.updated_at.ToDatetime()
    assert updated.created_at == registered.user.created_at

    assert (await auth.stub.GetProfile(GET, metadata=caller)).user == updated

    only_name = (
        await auth.stub.UpdateProfile(
            auth_pb2.UpdateProfileRequest(fullname="G. Hopper"), metadata=caller
        )
    ).user
    assert only_name.fullname == "G. Hopper"
    assert (only_name.email, only_name.phone, only_name.birthday) == (
        updated.email,
        updated.phone,
        updated.birthday,
    )


async def test_empty_update_returns_the_profile_unchanged(auth: Any) -> None:
    registered = await auth.register()
    response = await auth.stub.UpdateProfile(
        auth_pb2.UpdateProfileRequest(), metadata=auth.bearer(registered.access_token)
    )
    assert response.user == registered.user


async def test_update_refuses_values_of_other_users(auth: Any) -> None:
    other = (await auth.register()).user
    registered = await auth.register()
    caller = auth.bearer(registered.access_token)
    for request, message in (
        (auth_pb2.UpdateProfileRequest(email=other.email.upper()), "Email already exists"),
        (
            auth_pb2.UpdateProfileRequest(phone=other.phone[:5] + "-" + other.phone[5:]),
            "Phone number already exists",
        ),
    ):
        error = await auth.failure(auth.stub.UpdateProfile(request, metadata=caller))
        assert (error.code, error.message) == (grpc.StatusCode.ALREADY_EXISTS, message)
    # One's own values are no conflict.
    await auth.stub.UpdateProfile(
        auth_pb2.UpdateProfileRequest(email=registered.user.email, phone=registered.user.phone),
        metadata=caller,
    )
    assert (await auth.stub.GetProfile(GET, metadata=caller)).user.email == registered.user.email


@pytest.mark.parametrize(
    ("request_fields", "violations"),
    [
        ({"birthday": "2999-01-01"}, {"birthday": "must be in the past"}),
        ({"birthday": "2023-02-29"}, {"birthday": "must be a real date in YYYY-MM-DD format"}),
        ({"fullname": "   "}, {"fullname"}),
        ({"email": ""}, {"email"}),
        ({"phone": "12"}, {"phone"}),
    ],
)
async def test_update_follows_the_registration_rules(
    auth: Any, request_fields: dict[str, str], violations: Any
) -> None:
    registered = await auth.register()
    error = await auth.failure(
        auth.stub.UpdateProfile(
            auth_pb2.UpdateProfileRequest(**request_fields),
            metadata=auth.bearer(registered.access_token),
        )
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(violations, dict):
        assert error.violations == violations
    else:
        assert set(error.violations) == violations


async def test_profile_needs_a_token(auth: Any) -> None:
    for call in (
        auth.stub.GetProfile(GET),
        auth.stub.UpdateProfile(auth_pb2.UpdateProfileRequest(fullname="x")),
    ):
        error = await auth.failure(call)
        assert error.code == grpc.StatusCode.UNAUTHENTICATED


async def test_cache_keeps_the_newest_version(auth: Any, redis_client: redis.asyncio.Redis) -> None:
    """A reader that fetched the row before an update cannot put its stale copy back."""
    registered = await auth.register()
    metrics = AuthMetrics(CollectorRegistry())
    cache = RedisProfileCache(
        redis_client,
        RedisGuard(metrics),
        metrics,
        ttl_seconds=60,
        key_prefix=auth.settings.redis_key_prefix + "versions:",
    )
    v1 = user_from_proto(registered.user, role=Role.USER, version=1)
    v2 = replace(v1, fullname="Renamed", version=2)
    await cache.put(v2)
    await cache.put(v1)
    assert await cache.get(v1.id) == v2
    v3 = replace(v2, fullname="Renamed again", version=3)
    await cache.put(v3)
    assert await cache.get(v1.id) == v3


async def test_a_process_reads_what_another_wrote_after_it_decoded_the_old_copy(
    auth: Any, redis_client: redis.asyncio.Redis
) -> None:
    """Each process keeps decoded copies by the exact cached bytes; an update written by
    another process (another worker or replica) is read at once, never the copy kept."""
    registered = await auth.register()

    def process_cache() -> RedisProfileCache:
        metrics = AuthMetrics(CollectorRegistry())
        return RedisProfileCache(
            redis_client,
            RedisGuard(metrics),
            metrics,
            ttl_seconds=60,
            key_prefix=auth.settings.redis_key_prefix + "processes:",
        )

    reader, writer = process_cache(), process_cache()
    v1 = user_from_proto(registered.user, role=Role.USER, version=1)
    await writer.put(v1)
    assert await reader.get(v1.id) == v1
    assert await reader.get(v1.id) == v1  # the kept copy
    v2 = replace(v1, fullname="Renamed elsewhere", version=2)
    await writer.put(v2)
    assert await reader.get(v1.id) == v2
    promoted = replace(v2, role=Role.ADMIN, version=3)
    await writer.put(promoted)
    assert (await reader.get(v1.id)) == promoted
