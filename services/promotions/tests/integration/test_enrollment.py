"""First-login enrollment through gRPC (``TrackFirstLogin``) on real PostgreSQL: slots, orders,
"already participated", "campaign is full", eligibility, my-promotions/my-vouchers, voucher
validation and expiry, and the outbox events written with each enrollment."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from cake.events.v1 import payloads_pb2
from cake.promotions.v1 import promotions_pb2
from cake_promotions import bootstrap
from cake_promotions.domain.enrollment import FirstLogin
from cake_promotions.entrypoints.grpc.mapping import track_first_login_response
from cake_promotions.metrics import PromotionsMetrics
from cake_promotions.service.enrollment import FirstLoginEnrollment
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration

CODE_PATTERN = r"^CAKE-[A-Z0-9]{8}$"


def ts(instant: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(instant)
    return stamp


@pytest.fixture(scope="module")
async def server(start_server: Any) -> Any:
    return await start_server()


@pytest.fixture
async def campaign_with(server: Any, signer: Any, engine: AsyncEngine) -> Callable[..., Any]:
    """Create the only running campaign (earlier ones are ended first)."""

    async def create(**fields: Any) -> Any:
        async with engine.begin() as connection:
            await connection.execute(sa.text("UPDATE promotion_campaigns SET status = 'inactive'"))
        now = datetime.now(UTC)
        request = promotions_pb2.CreateCampaignRequest(
            name=fields.pop("name", "First login"),
            start_date=ts(now - timedelta(hours=1)),
            end_date=ts(now + timedelta(days=30)),
            **fields,
        )
        response = await server.stub.CreateCampaign(request, metadata=signer.metadata(1, "admin"))
        return response.campaign

    return create


@pytest.fixture(scope="module")
def enrollment(engine: AsyncEngine) -> FirstLoginEnrollment:
    """What the consumer runs for auth's USER_FIRST_LOGIN events."""
    return FirstLoginEnrollment(
        bootstrap.unit_of_work_factory(engine), PromotionsMetrics(CollectorRegistry())
    )


async def first_login(enrollment: FirstLoginEnrollment, user_id: int) -> Any:
    """The user's first login as auth's event reports it, answered in TrackFirstLogin's
    shape (``eligible`` only for the enrolling call, as in Cake)."""
    now = datetime.now(UTC)
    outcome = await enrollment.enroll_first_login(user_id, now, event_id=uuid.uuid4())
    assert outcome is not None
    return track_first_login_response(outcome, now)


async def track(server: Any, signer: Any, user_id: int) -> Any:
    return await server.stub.TrackFirstLogin(
        promotions_pb2.TrackFirstLoginRequest(), metadata=signer.metadata(user_id)
    )


async def test_without_a_running_campaign_nobody_is_eligible(
    server: Any,
    signer: Any,
    engine: AsyncEngine,
    enrollment: FirstLoginEnrollment,
    unique: Callable[[], int],
) -> None:
    async with engine.begin() as connection:
        await connection.execute(sa.text("UPDATE promotion_campaigns SET status = 'inactive'"))
    user = unique()
    decided = await first_login(enrollment, user)
    assert (decided.eligible, decided.message) == (False, "No active campaign available")
    # The event that found no campaign is kept with its reason, and reported.
    async with engine.connect() as connection:
        reason = await connection.scalar(
            sa.text("SELECT reason FROM first_login_decisions WHERE user_id = :u"), {"u": user}
        )
    assert reason == "no first-login campaign was running at the login time"
    response = await track(server, signer, user)
    assert not response.eligible
    assert response.message == "No active campaign available"
    assert not response.HasField("campaign_id")
    eligibility = await server.stub.GetEligibility(
        promotions_pb2.GetEligibilityRequest(), metadata=signer.metadata(user)
    )
    assert (eligibility.eligible, eligibility.message) == (False, "No active campaign available")


async def test_requires_a_token(server: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.stub.TrackFirstLogin(promotions_pb2.TrackFirstLoginRequest())
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_first_logins_fill_the_campaign_in_order(
    server: Any,
    signer: Any,
    campaign_with: Any,
    engine: AsyncEngine,
    enrollment: FirstLoginEnrollment,
    unique: Callable[[], int],
) -> None:
    campaign = await campaign_with(max_participants=3, discount_percentage=25)
    users = [unique() for _ in range(4)]

    before = await server.stub.GetEligibility(
        promotions_pb2.GetEligibilityRequest(), metadata=signer.metadata(users[0])
    )
    assert (before.eligible, before.campaign_id, before.remaining_slots) == (True, campaign.id, 3)
    assert before.message == "User is eligible for this campaign"

    enrolled = [await first_login(enrollment, user) for user in users[:3]]
    assert [response.participation_order for response in enrolled] == [1, 2, 3]
    assert [response.remaining_slots for response in enrolled] == [2, 1, 0]
    for response in enrolled:
        assert response.eligible
        assert response.campaign_id == campaign.id
        assert response.campaign_name == "First login"
        assert response.voucher.code
        assert response.voucher.status == "active"
        assert response.voucher.discount_percentage == 25
        assert (response.voucher.is_valid, response.voucher.is_expired) == (True, False)
        validity = response.voucher.expires_at.seconds - response.voucher.issued_at.seconds
        assert validity == 30 * 24 * 3600

    late = await first_login(enrollment, users[3])
    assert (late.eligible, late.message) == (False, "Campaign is full")
    assert (late.campaign_id, late.remaining_slots) == (campaign.id, 0)
    assert not late.HasField("voucher")
    late_eligibility = await server.stub.GetEligibility(
        promotions_pb2.GetEligibilityRequest(), metadata=signer.metadata(users[3])
    )
    assert (late_eligibility.eligible, late_eligibility.message) == (False, "Campaign is full")

    # TrackFirstLogin reports and never enrolls: Cake's `eligible: false` once enrolled.
    again = await track(server, signer, users[0])
    assert not again.eligible
    assert again.message == "User already participated in this campaign"
    assert again.participation_order == 1
    assert again.voucher.code == enrolled[0].voucher.code
    eligibility = await server.stub.GetEligibility(
        promotions_pb2.GetEligibilityRequest(), metadata=signer.metadata(users[0])
    )
    assert (eligibility.eligible, eligibility.message) == (
        False,
        "User already participated in this campaign",
    )

    told_full = await track(server, signer, users[3])
    assert (told_full.eligible, told_full.message) == (False, "Campaign is full")

    fetched = await server.stub.GetCampaign(promotions_pb2.GetCampaignRequest(id=campaign.id))
    assert (fetched.campaign.status, fetched.campaign.current_participants) == ("full", 3)

    async with engine.connect() as connection:
        events = (
            await connection.execute(
                sa.text(
                    "SELECT event_type, aggregate_type, aggregate_id, payload FROM outbox"
                    " WHERE aggregate_id = ANY(:users) ORDER BY id"
                ),
                {"users": [str(user) for user in users]},
            )
        ).all()
    assert [row.event_type for row in events] == ["PROMOTION_ENROLLMENT", "VOUCHER_ISSUED"] * 3
    assert {row.aggregate_type for row in events} == {"user"}
    enrollment = payloads_pb2.PromotionEnrollment.FromString(events[0].payload)
    assert (enrollment.user_id, enrollment.campaign_id) == (users[0], campaign.id)
    assert (enrollment.participation_order, enrollment.voucher_issued) == (1, True)
    issued = payloads_pb2.VoucherIssued.FromString(events[1].payload)
    assert (issued.code, issued.user_id) == (enrolled[0].voucher.code, users[0])
    assert issued.discount_percentage == "25.00"


async def test_concurrent_duplicates_of_one_user_take_one_slot(
    campaign_with: Any,
    engine: AsyncEngine,
    enrollment: FirstLoginEnrollment,
    unique: Callable[[], int],
) -> None:
    campaign = await campaign_with(max_participants=5)
    user = unique()

    responses = await asyncio.gather(*(first_login(enrollment, user) for _ in range(20)))

    assert sum(response.eligible for response in responses) == 1
    assert {response.voucher.code for response in responses} == {responses[0].voucher.code}
    assert (
        sorted(response.message for response in responses).count(
            "Congratulations! You have been enrolled and received a voucher"
        )
        == 1
    )
    async with engine.connect() as connection:
        current = await connection.scalar(
            sa.text("SELECT current_participants FROM promotion_campaigns WHERE id = :id"),
            {"id": campaign.id},
        )
        vouchers = await connection.scalar(
            sa.text("SELECT count(*) FROM vouchers WHERE user_id = :user"), {"user": user}
        )
    assert (current, vouchers) == (1, 1)


async def test_concurrent_first_logins_never_exceed_the_maximum(
    campaign_with: Any,
    engine: AsyncEngine,
    enrollment: FirstLoginEnrollment,
    unique: Callable[[], int],
) -> None:
    campaign = await campaign_with(max_participants=25)
    users = [unique() for _ in range(80)]

    responses = await asyncio.gather(*(first_login(enrollment, user) for user in users))

    winners = [response for response in responses if response.eligible]
    assert len(winners) == 25
    assert sorted(response.participation_order for response in winners) == list(range(1, 26))
    assert all(r.message == "Campaign is full" for r in responses if not r.eligible)
    async with engine.connect() as connection:
        row = (
            await connection.execute(
                sa.text(
                    "SELECT current_participants, status,"
                    " (SELECT count(*) FROM vouchers v JOIN user_promotions p"
                    "  ON p.id = v.user_promotion_id WHERE p.campaign_id = c.id) AS vouchers"
                    " FROM promotion_campaigns c WHERE id = :id"
                ),
                {"id": campaign.id},
            )
        ).one()
    assert tuple(row) == (25, "full", 25)


async def test_fifty_racing_first_logins_with_a_hundred_places_all_enroll(
    campaign_with: Any,
    engine: AsyncEngine,
    enrollment: FirstLoginEnrollment,
    unique: Callable[[], int],
) -> None:
    campaign = await campaign_with(max_participants=100)
    users = [unique() for _ in range(50)]

    responses = await asyncio.gather(*(first_login(enrollment, user) for user in users))

    assert all(response.eligible for response in responses)
    assert not [r for r in responses if r.message == "Campaign is full"]
    assert sorted(r.participation_order for r in responses) == list(range(1, 51))
    async with engine.connect() as connection:
        row = (
            await connection.execute(
                sa.text(
                    "SELECT current_participants, status,"
                    " (SELECT count(*) FROM vouchers v JOIN user_promotions p"
                    "  ON p.id = v.user_promotion_id WHERE p.campaign_id = c.id) AS vouchers"
                    " FROM promotion_campaigns c WHERE id = :id"
                ),
                {"id": campaign.id},
            )
        ).one()
    assert tuple(row) == (50, "active", 50)


async def test_a_batch_is_applied_once_however_often_it_is_delivered(
    campaign_with: Any,
    engine: AsyncEngine,
    enrollment: FirstLoginEnrollment,
    unique: Callable[[], int],
) -> None:
    """One poll batch: new users, a message delivered twice in it, a user's second "first"
    login; then the same batch again (redelivered after a crash before the offset commit)."""
    campaign = await campaign_with(max_participants=4)
    now = datetime.now(UTC)
    users = [unique() for _ in range(5)]
    logins = [
        FirstLogin(user, now + timedelta(milliseconds=i), uuid.uuid4())
        for i, user in enumerate(users)
    ]
    repeated = logins[1]
    relogged = FirstLogin(users[0], now + timedelta(seconds=1), uuid.uuid4())
    batch = [*logins, repeated, relogged]

    first = await enrollment.enroll_batch(batch)
    again = await enrollment.enroll_batch(batch)

    assert [outcome.result.value if outcome else None for outcome in first] == [
        "enrolled", "enrolled", "enrolled", "enrolled", "campaign_full", None,
        "already_participated",
    ]  # fmt: skip
    orders = [o.participation.participation_order for o in first[:4] if o and o.participation]
    assert orders == [1, 2, 3, 4]
    assert first[0] is not None and first[6] is not None
    assert first[6].voucher == first[0].voucher
    assert again == [None] * len(batch)
    async with engine.connect() as connection:
        counts = (
            await connection.execute(
                sa.text(
                    "SELECT (SELECT current_participants FROM promotion_campaigns WHERE id = :id),"
                    " (SELECT count(*) FROM user_promotions WHERE campaign_id = :id),"
                    " (SELECT count(*) FROM outbox WHERE aggregate_id = ANY(:users)),"
                    " (SELECT count(*) FROM first_login_decisions WHERE user_id = ANY(:ids))"
                ),
                {"id": campaign.id, "users": [str(u) for u in users], "ids": users},
            )
        ).one()
    assert tuple(counts) == (4, 4, 8, 5)


async def test_my_promotions_my_vouchers_and_validation(
    server: Any,
    signer: Any,
    campaign_with: Any,
    enrollment: FirstLoginEnrollment,
    unique: Callable[[], int],
) -> None:
    campaign = await campaign_with(
        name="Welcome", min_topup_amount=50000, max_discount_amount=20000
    )
    user = unique()
    enrolled = await first_login(enrollment, user)

    promotions = (
        await server.stub.ListMyPromotions(
            promotions_pb2.ListMyPromotionsRequest(), metadata=signer.metadata(user)
        )
    ).promotions
    assert len(promotions) == 1
    promotion = promotions[0]
    assert (promotion.campaign_id, promotion.campaign_name) == (campaign.id, "Welcome")
    assert (promotion.status, promotion.participation_order) == ("voucher_issued", 1)
    assert promotion.is_in_first_hundred
    assert promotion.HasField("voucher_issued_at") and not promotion.HasField("voucher_used_at")
    assert [voucher.code for voucher in promotion.vouchers] == [enrolled.voucher.code]

    vouchers = (
        await server.stub.ListMyVouchers(
            promotions_pb2.ListMyVouchersRequest(), metadata=signer.metadata(user)
        )
    ).vouchers
    assert [voucher.code for voucher in vouchers] == [enrolled.voucher.code]
    voucher = vouchers[0]
    assert (voucher.type, voucher.status, voucher.is_valid) == ("discount", "active", True)
    assert (voucher.min_topup_amount, voucher.max_discount_amount) == (50000, 20000)
    assert not voucher.HasField("used_amount") and not voucher.HasField("used_at")

    others = await server.stub.ListMyVouchers(
        promotions_pb2.ListMyVouchersRequest(), metadata=signer.metadata(unique())
    )
    assert list(others.vouchers) == []

    validated = await server.stub.ValidateVoucher(
        promotions_pb2.ValidateVoucherRequest(code=enrolled.voucher.code)
    )
    assert validated.voucher == voucher

    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await server.stub.ValidateVoucher(
            promotions_pb2.ValidateVoucherRequest(code="CAKE-NOPE0000")
        )
    assert missing.value.code() is grpc.StatusCode.NOT_FOUND
    assert missing.value.details() == "Voucher not found"


async def test_an_active_voucher_past_expiry_reads_and_is_stored_expired(
    server: Any,
    signer: Any,
    campaign_with: Any,
    engine: AsyncEngine,
    enrollment: FirstLoginEnrollment,
    unique: Callable[[], int],
) -> None:
    await campaign_with()
    user = unique()
    code = (await first_login(enrollment, user)).voucher.code
    async with engine.begin() as connection:
        await connection.execute(
            sa.text("UPDATE vouchers SET expires_at = now() - interval '1 second' WHERE code = :c"),
            {"c": code},
        )

    validated = (
        await server.stub.ValidateVoucher(promotions_pb2.ValidateVoucherRequest(code=code))
    ).voucher
    assert (validated.status, validated.is_valid, validated.is_expired) == ("expired", False, True)
    async with engine.connect() as connection:
        stored = (
            await connection.execute(
                sa.text(
                    "SELECT v.status, p.status FROM vouchers v"
                    " JOIN user_promotions p ON p.id = v.user_promotion_id WHERE v.code = :c"
                ),
                {"c": code},
            )
        ).one()
    assert tuple(stored) == ("expired", "expired")
    promotions = (
        await server.stub.ListMyPromotions(
            promotions_pb2.ListMyPromotionsRequest(), metadata=signer.metadata(user)
        )
    ).promotions
    assert promotions[0].status == "expired"
    assert promotions[0].vouchers[0].is_expired


async def test_a_user_enrolled_concurrently_is_retried_into_already_participated(
    engine: AsyncEngine, campaign_with: Any, unique: Callable[[], int]
) -> None:
    """Five enrollments of one user all pass the "already enrolled?" check, then queue on the
    campaign row held by another transaction: when it is released the first takes a slot and
    the other four hit the unique (user, campaign) constraint; they are retried and answer
    "already participated", handing their slots back."""
    campaign = await campaign_with(max_participants=10)
    enrollment = FirstLoginEnrollment(
        bootstrap.unit_of_work_factory(engine), PromotionsMetrics(CollectorRegistry())
    )
    user = unique()
    now = datetime.now(UTC)
    async with engine.connect() as blocker:
        transaction = await blocker.begin()
        await blocker.execute(
            sa.text("SELECT 1 FROM promotion_campaigns WHERE id = :id FOR UPDATE"),
            {"id": campaign.id},
        )
        attempts = [asyncio.create_task(enrollment.enroll_first_login(user, now)) for _ in range(5)]
        async with engine.connect() as observer:
            # Waits (up to ~30 s on a busy machine) until all five queue on the lock.
            for _ in range(1500):
                waiting = await observer.scalar(
                    sa.text(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                    )
                )
                if waiting == 5:
                    break
                # pg_stat_activity is a snapshot per transaction: end it to look again.
                await observer.rollback()
                await asyncio.sleep(0.02)
        assert waiting == 5
        await transaction.commit()
    outcomes = await asyncio.gather(*attempts)

    results = sorted(outcome.result.value for outcome in outcomes if outcome is not None)
    assert results == ["already_participated"] * 4 + ["enrolled"]
    assert len({outcome.voucher.code for outcome in outcomes if outcome and outcome.voucher}) == 1
    async with engine.connect() as connection:
        current = await connection.scalar(
            sa.text("SELECT current_participants FROM promotion_campaigns WHERE id = :id"),
            {"id": campaign.id},
        )
    assert current == 1


async def test_a_taken_voucher_code_is_drawn_again(
    engine: AsyncEngine, campaign_with: Any, unique: Callable[[], int]
) -> None:
    await campaign_with()
    uow_factory = bootstrap.unit_of_work_factory(engine)
    metrics = PromotionsMetrics(CollectorRegistry())
    suffix = f"{unique() % 10**6:06d}"
    first_code, second_code = f"CAKE-AA{suffix}", f"CAKE-BB{suffix}"
    now = datetime.now(UTC)
    first = await FirstLoginEnrollment(
        uow_factory, metrics, voucher_codes=iter([first_code]).__next__
    ).enroll_first_login(unique(), now)
    second = await FirstLoginEnrollment(
        uow_factory, metrics, voucher_codes=iter([first_code, second_code]).__next__
    ).enroll_first_login(unique(), now)

    assert first is not None and first.voucher is not None
    assert second is not None and second.voucher is not None
    assert (first.voucher.code, second.voucher.code) == (first_code, second_code)
    assert second.participation is not None
    assert second.voucher.user_promotion_id == second.participation.id
    assert second.voucher.issued_at == second.participation.voucher_issued_at


async def test_track_first_login_never_enrolls(
    server: Any,
    signer: Any,
    campaign_with: Any,
    engine: AsyncEngine,
    unique: Callable[[], int],
) -> None:
    """An existing user (no first-login event) calling it in a new campaign gets nothing."""
    campaign = await campaign_with(max_participants=5)
    user = unique()
    for _ in range(3):
        response = await track(server, signer, user)
        assert not response.eligible
        assert response.message == (
            "Not enrolled: only a first login while a campaign is active earns its voucher"
        )
        assert not response.HasField("voucher")
    async with engine.connect() as connection:
        taken = await connection.scalar(
            sa.text("SELECT current_participants FROM promotion_campaigns WHERE id = :id"),
            {"id": campaign.id},
        )
    assert taken == 0


async def test_a_late_event_is_decided_by_its_login_time(
    server: Any,
    signer: Any,
    campaign_with: Any,
    engine: AsyncEngine,
    enrollment: FirstLoginEnrollment,
    unique: Callable[[], int],
) -> None:
    campaign = await campaign_with(max_participants=5)
    during, after = unique(), unique()
    login_while_active = datetime.now(UTC)
    await asyncio.sleep(0.05)
    paused = await server.stub.UpdateCampaignStatus(
        promotions_pb2.UpdateCampaignStatusRequest(id=campaign.id, status="inactive"),
        metadata=signer.metadata(1, "admin"),
    )
    assert paused.campaign.status == "inactive"

    # Relay or Kafka lag: the event of a login made while it ran arrives after the pause.
    late = await enrollment.enroll_first_login(during, login_while_active, event_id=uuid.uuid4())
    assert late is not None and late.result.value == "enrolled"
    # A login after the pause enrolls nobody, and says why.
    refused = await enrollment.enroll_first_login(after, datetime.now(UTC), event_id=uuid.uuid4())
    assert refused is not None and refused.result.value == "no_campaign"
    assert (await track(server, signer, during)).message == (
        "User already participated in this campaign"
    )
