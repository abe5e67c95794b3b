"""Campaigns through a real gRPC channel and PostgreSQL: admin-only writes, Cake's defaults,
listing, 404s, and campaigns past their end stored as expired."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from cake.promotions.v1 import promotions_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration


def ts(instant: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(instant)
    return stamp


def create_request(**fields: Any) -> promotions_pb2.CreateCampaignRequest:
    now = datetime.now(UTC)
    values: dict[str, Any] = {
        "name": "First login 30%",
        "start_date": ts(now - timedelta(hours=1)),
        "end_date": ts(now + timedelta(days=30)),
    }
    values.update(fields)
    return promotions_pb2.CreateCampaignRequest(**values)


@pytest.fixture(scope="module")
async def server(start_server: Any) -> Any:
    return await start_server()


async def test_create_needs_a_token_and_the_admin_role(server: Any, signer: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as anonymous:
        await server.stub.CreateCampaign(create_request())
    assert anonymous.value.code() is grpc.StatusCode.UNAUTHENTICATED

    with pytest.raises(grpc.aio.AioRpcError) as user:
        await server.stub.CreateCampaign(create_request(), metadata=signer.metadata(5, "user"))
    assert user.value.code() is grpc.StatusCode.PERMISSION_DENIED


async def test_admin_creates_a_campaign_with_cake_defaults(server: Any, signer: Any) -> None:
    response = await server.stub.CreateCampaign(
        create_request(description="for new users"), metadata=signer.metadata(1, "admin")
    )
    campaign = response.campaign
    assert campaign.id > 0
    assert (campaign.name, campaign.description) == ("First login 30%", "for new users")
    assert (campaign.type, campaign.status) == ("first_login_discount", "active")
    assert (campaign.max_participants, campaign.current_participants) == (100, 0)
    assert campaign.remaining_slots == 100
    assert campaign.discount_percentage == 30
    assert (campaign.min_topup_amount, campaign.max_discount_amount) == (0, 0)
    assert campaign.voucher_validity_days == 30
    assert campaign.created_at.seconds > 0


async def test_admin_values_are_stored_exactly(
    server: Any, signer: Any, engine: AsyncEngine
) -> None:
    response = await server.stub.CreateCampaign(
        create_request(
            max_participants=5,
            discount_percentage=12.5,
            min_topup_amount=50000,
            max_discount_amount=20000.55,
            voucher_validity_days=7,
        ),
        metadata=signer.metadata(1, "admin"),
    )
    campaign = response.campaign
    assert (campaign.max_participants, campaign.remaining_slots) == (5, 5)
    assert (campaign.discount_percentage, campaign.min_topup_amount) == (12.5, 50000)
    assert (campaign.max_discount_amount, campaign.voucher_validity_days) == (20000.55, 7)
    async with engine.connect() as connection:
        row = (
            await connection.execute(
                sa.text(
                    "SELECT discount_percentage::text, min_topup_amount::text,"
                    " max_discount_amount::text FROM promotion_campaigns WHERE id = :id"
                ),
                {"id": campaign.id},
            )
        ).one()
    assert tuple(row) == ("12.50", "50000.00", "20000.55")


async def test_window_must_end_after_it_starts(
    server: Any, signer: Any, violated_fields: Callable[..., list[str]]
) -> None:
    now = datetime.now(UTC)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.stub.CreateCampaign(
            create_request(start_date=ts(now), end_date=ts(now - timedelta(days=1))),
            metadata=signer.metadata(1, "admin"),
        )
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(caught.value) == ["endDate"]


async def test_more_than_two_decimals_is_invalid(
    server: Any, signer: Any, violated_fields: Callable[..., list[str]]
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.stub.CreateCampaign(
            create_request(min_topup_amount=10.005), metadata=signer.metadata(1, "admin")
        )
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(caught.value) == ["minTopupAmount"]


async def test_list_is_public_active_only_newest_first(server: Any, signer: Any) -> None:
    admin = signer.metadata(1, "admin")
    older = (
        await server.stub.CreateCampaign(create_request(name="older"), metadata=admin)
    ).campaign
    newer = (
        await server.stub.CreateCampaign(create_request(name="newer"), metadata=admin)
    ).campaign
    paused = (
        await server.stub.CreateCampaign(create_request(name="paused"), metadata=admin)
    ).campaign
    await server.stub.UpdateCampaignStatus(
        promotions_pb2.UpdateCampaignStatusRequest(id=paused.id, status="inactive"), metadata=admin
    )

    listed = (await server.stub.ListCampaigns(promotions_pb2.ListCampaignsRequest())).campaigns

    ids = [campaign.id for campaign in listed]
    assert paused.id not in ids
    assert ids.index(newer.id) < ids.index(older.id)
    assert all(campaign.status == "active" for campaign in listed)
    assert [c.created_at.ToDatetime() for c in listed] == sorted(
        (c.created_at.ToDatetime() for c in listed), reverse=True
    )


async def test_get_is_public_and_unknown_ids_are_404(server: Any, signer: Any) -> None:
    created = (
        await server.stub.CreateCampaign(create_request(), metadata=signer.metadata(1, "admin"))
    ).campaign
    fetched = await server.stub.GetCampaign(promotions_pb2.GetCampaignRequest(id=created.id))
    assert fetched.campaign == created

    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await server.stub.GetCampaign(promotions_pb2.GetCampaignRequest(id=9_000_000_000))
    assert missing.value.code() is grpc.StatusCode.NOT_FOUND
    assert missing.value.details() == "Campaign not found"

    with pytest.raises(grpc.aio.AioRpcError) as malformed:
        await server.stub.GetCampaign(promotions_pb2.GetCampaignRequest(id=0))
    assert malformed.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_status_changes_are_admin_only_and_checked(server: Any, signer: Any) -> None:
    admin = signer.metadata(1, "admin")
    created = (await server.stub.CreateCampaign(create_request(), metadata=admin)).campaign

    with pytest.raises(grpc.aio.AioRpcError) as user:
        await server.stub.UpdateCampaignStatus(
            promotions_pb2.UpdateCampaignStatusRequest(id=created.id, status="inactive"),
            metadata=signer.metadata(9, "user"),
        )
    assert user.value.code() is grpc.StatusCode.PERMISSION_DENIED

    paused = await server.stub.UpdateCampaignStatus(
        promotions_pb2.UpdateCampaignStatusRequest(id=created.id, status="inactive"), metadata=admin
    )
    assert paused.campaign.status == "inactive"
    resumed = await server.stub.UpdateCampaignStatus(
        promotions_pb2.UpdateCampaignStatusRequest(id=created.id, status="active"), metadata=admin
    )
    assert resumed.campaign.status == "active"

    with pytest.raises(grpc.aio.AioRpcError) as not_full:
        await server.stub.UpdateCampaignStatus(
            promotions_pb2.UpdateCampaignStatusRequest(id=created.id, status="full"), metadata=admin
        )
    assert not_full.value.code() is grpc.StatusCode.FAILED_PRECONDITION

    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await server.stub.UpdateCampaignStatus(
            promotions_pb2.UpdateCampaignStatusRequest(id=9_000_000_000, status="active"),
            metadata=admin,
        )
    assert missing.value.code() is grpc.StatusCode.NOT_FOUND
    assert missing.value.details() == "Campaign not found"


async def test_campaigns_past_their_end_are_stored_expired(
    server: Any, signer: Any, engine: AsyncEngine
) -> None:
    admin = signer.metadata(1, "admin")
    created = (await server.stub.CreateCampaign(create_request(), metadata=admin)).campaign
    async with engine.begin() as connection:
        await connection.execute(
            sa.text(
                "UPDATE promotion_campaigns SET start_date = now() - interval '2 days',"
                " end_date = now() - interval '1 second' WHERE id = :id"
            ),
            {"id": created.id},
        )

    listed = (await server.stub.ListCampaigns(promotions_pb2.ListCampaignsRequest())).campaigns
    assert created.id not in [campaign.id for campaign in listed]
    fetched = await server.stub.GetCampaign(promotions_pb2.GetCampaignRequest(id=created.id))
    assert fetched.campaign.status == "expired"
    async with engine.connect() as connection:
        stored = await connection.scalar(
            sa.text("SELECT status FROM promotion_campaigns WHERE id = :id"), {"id": created.id}
        )
    assert stored == "expired"

    with pytest.raises(grpc.aio.AioRpcError) as reactivate:
        await server.stub.UpdateCampaignStatus(
            promotions_pb2.UpdateCampaignStatusRequest(id=created.id, status="active"),
            metadata=admin,
        )
    assert reactivate.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert reactivate.value.details() == "Campaign has ended"
