"""The top-up use case (reserve, charge, confirm or compensate, replay) against in-memory
fakes of its ports: the unit of work and its repositories, the bank and the clock.

The fake unit of work is transactional like the real one: a use case works on a copy of the
store that only a commit writes back, so "a rolled-back step changed nothing" can fail here.
The SQL behind each repository method has its own integration tests.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Self

import pytest
from cake_common.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from cake_promotions.domain.payments import PaymentRequest, PaymentResult
from cake_promotions.domain.topups import (
    PaymentOutcome,
    TopupCommand,
    TopupReceipt,
    TopupRecord,
    TopupStatus,
)
from cake_promotions.domain.vouchers import Voucher, VoucherStatus
from cake_promotions.metrics import PromotionsMetrics
from cake_promotions.service.ports import StoredKey
from cake_promotions.service.topups import (
    PAYMENT_FAILED_REASON,
    PAYMENT_PENDING_REASON,
    TOPUP_IN_PROGRESS_REASON,
    TopupProcessing,
)
from prometheus_client import CollectorRegistry

NOW = datetime(2026, 11, 20, 8, 30, tzinfo=UTC)
USER = 7
PENDING_TIMEOUT = timedelta(seconds=30)


# -- fakes of the ports --------------------------------------------------------------------


@dataclass
class Store:
    """What the database would hold (committed state)."""

    vouchers: dict[str, Voucher] = field(default_factory=dict)
    topups: dict[str, TopupRecord] = field(default_factory=dict)
    keys: dict[tuple[int, str], StoredKey] = field(default_factory=dict)
    participations_used: dict[int, datetime] = field(default_factory=dict)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    commits: int = 0


class FakeVouchers:
    def __init__(self, store: Store) -> None:
        self._s = store

    def _by_id(self, voucher_id: int) -> Voucher:
        return next(v for v in self._s.vouchers.values() if v.id == voucher_id)

    async def get_by_code(self, code: str, *, for_update: bool = False) -> Voucher | None:
        return self._s.vouchers.get(code)

    async def reserve(self, voucher_id: int, *, until: datetime, now: datetime) -> None:
        voucher = self._by_id(voucher_id)
        if voucher.status is VoucherStatus.ACTIVE:
            self._s.vouchers[voucher.code] = replace(
                voucher, status=VoucherStatus.RESERVED, reserved_until=until
            )

    async def release(self, voucher_id: int, now: datetime) -> None:
        voucher = self._by_id(voucher_id)
        if voucher.status is VoucherStatus.RESERVED:
            self._s.vouchers[voucher.code] = replace(
                voucher, status=VoucherStatus.ACTIVE, reserved_until=None
            )

    async def mark_used(
        self,
        voucher_id: int,
        *,
        used_at: datetime,
        used_amount: Decimal,
        discount_amount: Decimal,
        transaction_reference: str,
    ) -> Voucher:
        voucher = replace(
            self._by_id(voucher_id),
            status=VoucherStatus.USED,
            reserved_until=None,
            used_at=used_at,
            used_amount=used_amount,
            discount_amount=discount_amount,
            transaction_reference=transaction_reference,
        )
        self._s.vouchers[voucher.code] = voucher
        return voucher

    async def expire_overdue(
        self, now: datetime, *, user_id: int | None = None, code: str | None = None
    ) -> None:
        for key, voucher in list(self._s.vouchers.items()):
            if code is not None and voucher.code != code:
                continue
            if voucher.status is VoucherStatus.ACTIVE and voucher.expires_at <= now:
                self._s.vouchers[key] = replace(voucher, status=VoucherStatus.EXPIRED)


class FakeTopups:
    def __init__(self, store: Store) -> None:
        self._s = store

    async def add(self, record: TopupRecord) -> None:
        assert record.transaction_id not in self._s.topups
        self._s.topups[record.transaction_id] = record

    async def get(self, transaction_id: str, *, for_update: bool = False) -> TopupRecord | None:
        return self._s.topups.get(transaction_id)

    async def set_status(self, transaction_id: str, status: TopupStatus, now: datetime) -> None:
        self._s.topups[transaction_id] = replace(self._s.topups[transaction_id], status=status)


class FakeIdempotencyKeys:
    def __init__(self, store: Store) -> None:
        self._s = store

    async def claim(self, user_id: int, key: str, fingerprint: str, transaction_id: str) -> bool:
        if (user_id, key) in self._s.keys:
            return False
        self._s.keys[(user_id, key)] = StoredKey(fingerprint, None, transaction_id)
        return True

    async def get(self, user_id: int, key: str) -> StoredKey | None:
        return self._s.keys.get((user_id, key))

    async def forget(self, user_id: int, key: str) -> None:
        del self._s.keys[(user_id, key)]

    async def store_receipt(self, user_id: int, key: str, receipt: TopupReceipt) -> None:
        self._s.keys[(user_id, key)] = replace(self._s.keys[(user_id, key)], receipt=receipt)


class FakeParticipations:
    def __init__(self, store: Store) -> None:
        self._s = store

    async def mark_voucher_used(self, participation_id: int, used_at: datetime) -> None:
        self._s.participations_used[participation_id] = used_at


class FakeEvents:
    def __init__(self, store: Store) -> None:
        self._s = store

    async def voucher_used(self, voucher: Voucher, **details: Any) -> None:
        self._s.events.append(("voucher_used", {"voucher": voucher, **details}))

    async def payment_processed(self, record: TopupRecord, *, processed_at: datetime) -> None:
        self._s.events.append(("payment_processed", {"record": record, "at": processed_at}))


class FakeUnitOfWork:
    """Works on a copy of the store; ``commit`` publishes it, leaving without one drops it."""

    def __init__(self, store: Store) -> None:
        self._committed = store

    async def __aenter__(self) -> Self:
        self._work = copy.deepcopy(self._committed)
        self.vouchers = FakeVouchers(self._work)
        self.topups = FakeTopups(self._work)
        self.idempotency_keys = FakeIdempotencyKeys(self._work)
        self.participations = FakeParticipations(self._work)
        self.events = FakeEvents(self._work)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.rollback()

    async def commit(self) -> None:
        commits = self._committed.commits + 1
        self._committed.__dict__.update(copy.deepcopy(self._work).__dict__)
        self._committed.commits = commits

    async def rollback(self) -> None:
        self._work.__dict__.update(copy.deepcopy(self._committed).__dict__)


class FakeBank:
    """Answers each charge with the next scripted outcome; records what it was asked."""

    def __init__(self, store: Store, *outcomes: PaymentOutcome) -> None:
        self._store = store
        self.outcomes = list(outcomes)
        self.charges: list[PaymentRequest] = []
        self.voucher_status_while_charging: list[VoucherStatus] = []

    async def charge(self, request: PaymentRequest) -> PaymentResult:
        self.charges.append(request)
        # What the database holds while the bank is called: the reservation is committed.
        self.voucher_status_while_charging += [v.status for v in self._store.vouchers.values()]
        outcome = self.outcomes.pop(0)
        reason = None if outcome is PaymentOutcome.CHARGED else f"bank said {outcome.value}"
        return PaymentResult(outcome, reason)

    async def settle_status(self, transaction_id: str) -> PaymentResult:
        raise AssertionError("the request path never asks for a final status")

    async def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


@dataclass
class World:
    store: Store
    bank: FakeBank
    clock: Clock
    metrics: PromotionsMetrics
    after_charge_calls: list[str]
    processing: TopupProcessing

    def count(self, result: str) -> float:
        return self.metrics.topups.labels(result=result)._value.get()


def make_world(*outcomes: PaymentOutcome) -> World:
    store = Store()
    bank = FakeBank(store, *outcomes)
    clock = Clock()
    metrics = PromotionsMetrics(CollectorRegistry())
    calls: list[str] = []
    processing = TopupProcessing(
        lambda: FakeUnitOfWork(store),  # type: ignore[arg-type, return-value]
        bank,
        metrics,
        pending_timeout=PENDING_TIMEOUT,
        reconcile_interval=timedelta(seconds=10),
        charge_deadline=timedelta(seconds=5),
        after_charge=lambda: calls.append("after_charge"),
        clock=clock,
    )
    return World(store, bank, clock, metrics, calls, processing)


def voucher(
    code: str = "CAKE30",
    *,
    user_id: int = USER,
    status: VoucherStatus = VoucherStatus.ACTIVE,
    expires_at: datetime = NOW + timedelta(days=30),
    max_discount: Decimal | None = Decimal("50.00"),
) -> Voucher:
    return Voucher(
        id=11,
        code=code,
        user_promotion_id=21,
        user_id=user_id,
        type="DISCOUNT",
        status=status,
        discount_percentage=Decimal("30.00"),
        min_topup_amount=Decimal("10.00"),
        max_discount_amount=max_discount,
        issued_at=NOW - timedelta(days=1),
        expires_at=expires_at,
        used_at=None,
        used_amount=None,
        discount_amount=None,
        transaction_reference=None,
    )


def command(amount: str = "100.00", code: str | None = "CAKE30") -> TopupCommand:
    return TopupCommand(
        user_id=USER,
        phone_number="+84901234567",
        amount=Decimal(amount),
        voucher_code=code,
        payment_method="BANK_TRANSFER",
    )


def statuses(world: World) -> list[TopupStatus]:
    return [e[1]["record"].status for e in world.store.events if e[0] == "payment_processed"]


CHARGED, NOT_CHARGED, UNKNOWN = (
    PaymentOutcome.CHARGED,
    PaymentOutcome.NOT_CHARGED,
    PaymentOutcome.UNKNOWN,
)


# -- charge and confirm ---------------------------------------------------------------------


async def test_without_voucher_the_full_amount_is_charged_and_confirmed() -> None:
    world = make_world(CHARGED)

    receipt = await world.processing.topup(command("80.00", code=None))

    assert (receipt.original_amount, receipt.discount_amount, receipt.final_amount) == (
        Decimal("80.00"),
        Decimal("0.00"),
        Decimal("80.00"),
    )
    assert receipt.message == "Top-up successful!"
    assert not receipt.replayed
    [charge] = world.bank.charges
    assert charge.amount == Decimal("80.00")
    assert charge.transaction_id == receipt.transaction_id
    assert world.store.topups[receipt.transaction_id].status is TopupStatus.SUCCEEDED
    # One event when recorded pending, one when settled; two transactions.
    assert statuses(world) == [TopupStatus.PENDING, TopupStatus.SUCCEEDED]
    assert world.store.commits == 2
    assert world.after_charge_calls == ["after_charge"]
    assert world.count("succeeded") == 1


async def test_a_voucher_is_reserved_while_charging_then_spent() -> None:
    world = make_world(CHARGED)
    world.store.vouchers["CAKE30"] = voucher()

    receipt = await world.processing.topup(command("100.00"))

    # 30 % of 100, under the 50 cap; the bank charges what is left.
    assert receipt.discount_amount == Decimal("30.00")
    assert receipt.final_amount == Decimal("70.00")
    assert receipt.message == "Top-up successful! You saved 30 with your voucher."
    assert [c.amount for c in world.bank.charges] == [Decimal("70.00")]
    assert [c.original_amount for c in world.bank.charges] == [Decimal("100.00")]
    assert world.bank.voucher_status_while_charging == [VoucherStatus.RESERVED]
    spent = world.store.vouchers["CAKE30"]
    assert spent.status is VoucherStatus.USED
    assert spent.used_amount == Decimal("100.00")
    assert spent.discount_amount == Decimal("30.00")
    assert spent.transaction_reference == receipt.transaction_id
    assert spent.reserved_until is None
    assert world.store.participations_used == {21: NOW}
    [used] = [e[1] for e in world.store.events if e[0] == "voucher_used"]
    assert used["transaction_id"] == receipt.transaction_id
    assert used["discount_amount"] == Decimal("30.00")


async def test_the_discount_is_capped_at_the_vouchers_maximum() -> None:
    world = make_world(CHARGED)
    world.store.vouchers["CAKE30"] = voucher(max_discount=Decimal("20.00"))

    receipt = await world.processing.topup(command("100.00"))

    assert (receipt.discount_amount, receipt.final_amount) == (
        Decimal("20.00"),
        Decimal("80.00"),
    )
    assert world.bank.charges[0].amount == Decimal("80.00")


# -- decline, error, timeout -----------------------------------------------------------------


async def test_a_declined_charge_fails_and_releases_the_voucher() -> None:
    world = make_world(NOT_CHARGED)
    world.store.vouchers["CAKE30"] = voucher()

    with pytest.raises(FailedPrecondition) as raised:
        await world.processing.topup(command(), idempotency_key="k-1")

    assert raised.value.reason == PAYMENT_FAILED_REASON
    [record] = world.store.topups.values()
    assert record.status is TopupStatus.FAILED
    released = world.store.vouchers["CAKE30"]
    assert (released.status, released.reserved_until) == (VoucherStatus.ACTIVE, None)
    assert world.store.participations_used == {}
    assert not [e for e in world.store.events if e[0] == "voucher_used"]
    assert statuses(world) == [TopupStatus.PENDING, TopupStatus.FAILED]
    # Nothing to replay: the key is free for a retry.
    assert world.store.keys == {}
    assert world.count("payment_failed") == 1
    assert world.count("rejected") == 0


async def test_a_retry_after_a_decline_charges_again_under_the_same_key() -> None:
    world = make_world(NOT_CHARGED, CHARGED)
    world.store.vouchers["CAKE30"] = voucher()
    with pytest.raises(FailedPrecondition):
        await world.processing.topup(command(), idempotency_key="k-1")

    receipt = await world.processing.topup(command(), idempotency_key="k-1")

    assert not receipt.replayed
    assert len(world.bank.charges) == 2
    assert world.bank.charges[0].transaction_id != world.bank.charges[1].transaction_id
    assert world.store.vouchers["CAKE30"].status is VoucherStatus.USED


@pytest.mark.parametrize("bank_reason", ["bank error", "deadline exceeded"])
async def test_an_unknown_outcome_leaves_the_topup_pending_and_the_voucher_reserved(
    bank_reason: str,
) -> None:
    # An error or a timeout at the bank is UNKNOWN: it may have charged, so nothing is undone.
    world = make_world(UNKNOWN)
    world.store.vouchers["CAKE30"] = voucher()

    with pytest.raises(Unavailable) as raised:
        await world.processing.topup(command(), idempotency_key="k-1")

    error = raised.value
    assert error.reason == PAYMENT_PENDING_REASON
    [record] = world.store.topups.values()
    assert error.metadata == {"transactionId": record.transaction_id}
    assert error.retry_after_seconds == 1  # the bank may still answer soon
    assert record.status is TopupStatus.PENDING
    held = world.store.vouchers["CAKE30"]
    assert (held.status, held.reserved_until) == (
        VoucherStatus.RESERVED,
        NOW + PENDING_TIMEOUT,
    )
    assert world.store.keys[(USER, "k-1")].receipt is None
    assert statuses(world) == [TopupStatus.PENDING]
    assert world.count("pending") == 1


async def test_a_late_unknown_outcome_says_when_the_reconciler_will_have_settled_it() -> None:
    world = make_world(UNKNOWN)
    original_charge = world.bank.charge

    async def slow_charge(request: PaymentRequest) -> PaymentResult:
        world.clock.now = NOW + timedelta(seconds=12)  # past the 5 s charge deadline
        return await original_charge(request)

    world.bank.charge = slow_charge  # type: ignore[method-assign]

    with pytest.raises(Unavailable) as raised:
        await world.processing.topup(command(code=None))

    # created at NOW, settled by NOW + 30 s timeout + 10 s reconcile interval.
    assert raised.value.retry_after_seconds == 28


# -- idempotency -------------------------------------------------------------------------------


async def test_a_replay_answers_the_first_receipt_without_charging_again() -> None:
    world = make_world(CHARGED)
    world.store.vouchers["CAKE30"] = voucher()
    first = await world.processing.topup(command(), idempotency_key="k-1")
    events_after_first = list(world.store.events)

    again = await world.processing.topup(command(), idempotency_key="k-1")

    assert again.replayed
    assert replace(again, replayed=False) == first
    assert len(world.bank.charges) == 1
    assert len(world.store.topups) == 1
    assert world.store.events == events_after_first
    assert world.count("replayed") == 1


async def test_a_key_reused_for_another_request_is_refused() -> None:
    world = make_world(CHARGED)
    await world.processing.topup(command("100.00", code=None), idempotency_key="k-1")

    with pytest.raises(AlreadyExists) as raised:
        await world.processing.topup(command("90.00", code=None), idempotency_key="k-1")

    assert raised.value.reason == "IDEMPOTENCY_KEY_REUSED"
    assert len(world.bank.charges) == 1
    assert len(world.store.topups) == 1


async def test_a_retry_while_the_first_is_pending_is_told_to_come_back() -> None:
    world = make_world(UNKNOWN)
    with pytest.raises(Unavailable):
        await world.processing.topup(command(code=None), idempotency_key="k-1")
    [record] = world.store.topups.values()
    world.clock.now = NOW + timedelta(seconds=20)

    with pytest.raises(Aborted) as raised:
        await world.processing.topup(command(code=None), idempotency_key="k-1")

    assert raised.value.reason == TOPUP_IN_PROGRESS_REASON
    assert raised.value.metadata == {"transactionId": record.transaction_id}
    assert raised.value.retry_after_seconds == 20  # 30 + 10 - 20
    assert len(world.bank.charges) == 1
    assert world.count("in_progress") == 1


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\there"])
async def test_a_malformed_key_is_refused_before_anything_happens(key: str) -> None:
    world = make_world()

    with pytest.raises(InvalidArgument) as raised:
        await world.processing.topup(command(code=None), idempotency_key=key)

    assert [v.field for v in raised.value.violations] == ["idempotency-key"]
    assert world.bank.charges == []
    assert world.store.commits == 0


# -- vouchers that cannot be spent ---------------------------------------------------------------


async def test_an_unknown_voucher_is_refused_and_nothing_is_recorded() -> None:
    world = make_world()

    with pytest.raises(NotFound):
        await world.processing.topup(command(code="NOPE"), idempotency_key="k-1")

    assert world.bank.charges == []
    assert world.store.topups == {}
    assert world.store.keys == {}  # the claim was rolled back with the rest
    assert world.store.events == []
    assert world.count("rejected") == 1


@pytest.mark.parametrize(
    ("spent", "reason"),
    [
        (voucher(user_id=USER + 1), "VOUCHER_NOT_OWNED"),
        (voucher(status=VoucherStatus.RESERVED), "VOUCHER_NOT_SPENDABLE"),
        (voucher(status=VoucherStatus.USED), "VOUCHER_NOT_SPENDABLE"),
    ],
)
async def test_a_voucher_of_someone_else_or_in_use_is_refused(spent: Voucher, reason: str) -> None:
    world = make_world()
    world.store.vouchers["CAKE30"] = spent

    with pytest.raises(FailedPrecondition) as raised:
        await world.processing.topup(command())

    assert raised.value.reason == reason
    assert world.store.vouchers["CAKE30"] == spent
    assert world.bank.charges == []
    assert world.store.commits == 0


async def test_an_amount_below_the_minimum_is_refused() -> None:
    world = make_world()
    world.store.vouchers["CAKE30"] = voucher()

    with pytest.raises(FailedPrecondition) as raised:
        await world.processing.topup(command("9.99"))

    assert raised.value.reason == "BELOW_MINIMUM_TOPUP"
    assert raised.value.metadata == {"minTopupAmount": "10"}
    assert world.store.vouchers["CAKE30"].status is VoucherStatus.ACTIVE


async def test_an_overdue_voucher_is_refused_and_stored_expired() -> None:
    world = make_world()
    world.store.vouchers["CAKE30"] = voucher(expires_at=NOW - timedelta(seconds=1))

    with pytest.raises(FailedPrecondition) as raised:
        await world.processing.topup(command(), idempotency_key="k-1")

    assert raised.value.reason == "VOUCHER_NOT_SPENDABLE"
    assert world.store.vouchers["CAKE30"].status is VoucherStatus.EXPIRED
    assert world.store.keys == {}  # only the expiry was committed, not the claim
    assert world.store.topups == {}
    assert world.store.commits == 1


# -- settlement ---------------------------------------------------------------------------------


async def test_settling_twice_applies_the_outcome_once() -> None:
    world = make_world(UNKNOWN)
    world.store.vouchers["CAKE30"] = voucher()
    with pytest.raises(Unavailable):
        await world.processing.topup(command(), idempotency_key="k-1")
    [transaction_id] = world.store.topups

    first = await world.processing.settlement.settle(transaction_id, CHARGED)
    events = list(world.store.events)
    again = await world.processing.settlement.settle(transaction_id, CHARGED)

    assert first.status is again.status is TopupStatus.SUCCEEDED
    assert world.store.events == events
    assert world.store.vouchers["CAKE30"].status is VoucherStatus.USED
    # The stored answer is now replayed to the client's retry.
    replayed = await world.processing.topup(command(), idempotency_key="k-1")
    assert replayed.replayed
    assert replayed.transaction_id == transaction_id
    assert replayed.final_amount == Decimal("70.00")


async def test_settling_an_unknown_outcome_changes_nothing() -> None:
    world = make_world(UNKNOWN)
    with pytest.raises(Unavailable):
        await world.processing.topup(command(code=None))
    [transaction_id] = world.store.topups
    commits = world.store.commits

    record = await world.processing.settlement.settle(transaction_id, UNKNOWN)

    assert record.status is TopupStatus.PENDING
    assert world.store.commits == commits
