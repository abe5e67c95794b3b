"""End-to-end: a new user's first login earns a voucher through the real pipeline, and the
voucher pays for a top-up.

register → login (auth, gRPC) → USER_FIRST_LOGIN in auth's outbox → relay (events) → Kafka
→ promotions consumer → voucher visible in ListMyVouchers → Topup → voucher ``used``.

Every component is the real one from the test stack. An admin token (signed with the stack's
development key, as ``cake-auth`` would) creates a campaign that is running now. Other tests
may create campaigns in the same stack, so the voucher's own terms give the expected discount.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

import grpc
import pytest
from cake.auth.v1 import auth_pb2, auth_pb2_grpc
from cake.promotions.v1 import promotions_pb2, promotions_pb2_grpc, voucher_pb2
from cake_devtools.stack import Stack
from google.protobuf.timestamp_pb2 import Timestamp

pytestmark = pytest.mark.e2e

VOUCHER_WAIT_SECONDS = 30


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def ts(instant: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(instant)
    return stamp


@pytest.fixture
def channels(full_stack: Stack) -> Iterator[tuple[grpc.Channel, grpc.Channel]]:
    environment = full_stack.service_environment()
    auth_port = environment["auth"]["CAKE_AUTH_GRPC_PORT"]
    promotions_port = environment["promotions"]["CAKE_PROMOTIONS_GRPC_PORT"]
    with (
        grpc.insecure_channel(f"127.0.0.1:{auth_port}") as auth,
        grpc.insecure_channel(f"127.0.0.1:{promotions_port}") as promotions,
    ):
        yield auth, promotions


def test_first_login_voucher_pays_for_a_topup(
    channels: tuple[grpc.Channel, grpc.Channel], admin_token: str
) -> None:
    auth = auth_pb2_grpc.AuthServiceStub(channels[0])
    promotions = promotions_pb2_grpc.PromotionsServiceStub(channels[1])
    now = datetime.now(UTC)
    admin = bearer(admin_token)
    campaign = promotions.CreateCampaign(
        promotions_pb2.CreateCampaignRequest(
            name=f"e2e first login {now:%H%M%S}",
            start_date=ts(now - timedelta(minutes=1)),
            end_date=ts(now + timedelta(days=1)),
            max_participants=1000,
            discount_percentage=30,
        ),
        metadata=admin,
        timeout=10,
    ).campaign
    try:
        _first_login_voucher_pays_for_a_topup(auth, promotions)
    finally:
        # Leave no running campaign behind to enroll other tests' users.
        promotions.UpdateCampaignStatus(
            promotions_pb2.UpdateCampaignStatusRequest(id=campaign.id, status="expired"),
            metadata=admin,
            timeout=10,
        )


def _first_login_voucher_pays_for_a_topup(
    auth: auth_pb2_grpc.AuthServiceStub, promotions: promotions_pb2_grpc.PromotionsServiceStub
) -> None:
    suffix = secrets.token_hex(4)
    password = "e2e-" + secrets.token_urlsafe(12)
    auth.Register(
        auth_pb2.RegisterRequest(
            fullname="E2E Promotions",
            email=f"e2e.promo.{suffix}@example.com",
            username=f"e2e_promo_{suffix}",
            phone=f"+8490{secrets.randbelow(10**7):07d}",
            password=password,
            birthday="1990-01-01",
        ),
        timeout=10,
    )
    login = auth.Login(
        auth_pb2.LoginRequest(account=f"e2e_promo_{suffix}", password=password), timeout=10
    )
    user = bearer(login.access_token)

    deadline = time.monotonic() + VOUCHER_WAIT_SECONDS
    vouchers: list[voucher_pb2.Voucher] = []
    while time.monotonic() < deadline and not vouchers:
        vouchers = list(
            promotions.ListMyVouchers(
                promotions_pb2.ListMyVouchersRequest(), metadata=user, timeout=5
            ).vouchers
        )
        if not vouchers:
            time.sleep(0.5)
    assert len(vouchers) == 1, f"no voucher within {VOUCHER_WAIT_SECONDS}s of the first login"
    voucher = vouchers[0]
    assert (voucher.status, voucher.is_valid) == ("active", True)

    amount = max(Decimal("100000"), Decimal(str(voucher.min_topup_amount)))
    expected = (amount * Decimal(str(voucher.discount_percentage)) / 100).quantize(
        Decimal("0.01"), rounding=ROUND_HALF_UP
    )
    if voucher.max_discount_amount:
        expected = min(expected, Decimal(str(voucher.max_discount_amount)))
    receipt = promotions.Topup(
        promotions_pb2.TopupRequest(
            phone_number="+84901234567", amount=float(amount), voucher_code=voucher.code
        ),
        metadata=(*user, ("idempotency-key", f"e2e-{suffix}")),
        timeout=10,
    )
    assert receipt.success
    assert Decimal(str(receipt.discount_amount)) == expected
    assert Decimal(str(receipt.final_amount)) == amount - expected

    after = promotions.ListMyVouchers(
        promotions_pb2.ListMyVouchersRequest(), metadata=user, timeout=5
    ).vouchers
    assert [(v.code, v.status, v.is_valid) for v in after] == [(voucher.code, "used", False)]
    assert after[0].transaction_reference == receipt.transaction_id
