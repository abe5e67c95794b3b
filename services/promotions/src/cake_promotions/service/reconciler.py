"""The reconciler: settles the top-ups whose request never learnt the bank's answer.

Every ``interval`` it takes the pending top-ups older than ``pending_timeout`` (the instant
their vouchers' reservations end) and asks the bank for each a final answer (an id never
charged is voided there, so a charge still in flight cannot go through afterwards):
charged → confirm, not charged → compensate. While the bank cannot be asked, a top-up stays
pending (releasing its voucher without knowing could spend the discount twice) and is tried
again at the next round. Several replicas may reconcile at once: settling is idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import timedelta

from cake_common.logging import get_logger

from cake_promotions.domain.topups import PaymentOutcome, TopupStatus
from cake_promotions.metrics import PromotionsMetrics
from cake_promotions.service.clock import Clock, utc_now
from cake_promotions.service.ports import PaymentGateway, UnitOfWorkFactory
from cake_promotions.service.topups import TopupSettlement

RECONCILE_BATCH = 200
"""Overdue top-ups taken per round."""
CONCURRENT_QUERIES = 16
"""Status queries in flight at once (each waits at most the bank's deadline)."""

_log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class ReconcileRound:
    confirmed: int = 0
    compensated: int = 0
    unresolved: int = 0


class TopupReconciler:
    def __init__(
        self,
        uow_factory: UnitOfWorkFactory,
        payments: PaymentGateway,
        settlement: TopupSettlement,
        metrics: PromotionsMetrics,
        *,
        pending_timeout: timedelta,
        interval: timedelta,
        clock: Clock = utc_now,
    ) -> None:
        self._uow_factory = uow_factory
        self._payments = payments
        self._settlement = settlement
        self._metrics = metrics
        self._pending_timeout = pending_timeout
        self._interval = interval
        self._clock = clock
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def reconcile(self) -> ReconcileRound:
        """Settle every overdue pending top-up the bank can answer for, now."""
        async with self._uow_factory() as uow:
            overdue = await uow.topups.pending_created_before(
                self._clock() - self._pending_timeout, limit=RECONCILE_BATCH
            )
        gate = asyncio.Semaphore(CONCURRENT_QUERIES)

        async def settle(transaction_id: str) -> TopupStatus | None:
            async with gate:
                answer = await self._payments.settle_status(transaction_id)
                if answer.outcome is PaymentOutcome.UNKNOWN:
                    return None
                settled = await self._settlement.settle(transaction_id, answer.outcome)
                return settled.status

        statuses = await asyncio.gather(*(settle(txn) for txn in overdue))
        result = ReconcileRound(
            confirmed=statuses.count(TopupStatus.SUCCEEDED),
            compensated=statuses.count(TopupStatus.FAILED),
            unresolved=statuses.count(None),
        )
        for name, count in (
            ("confirmed", result.confirmed),
            ("compensated", result.compensated),
            ("unresolved", result.unresolved),
        ):
            if count:
                self._metrics.topups_reconciled.labels(result=name).inc(count)
        if overdue:
            _log.info(
                "pending top-ups reconciled",
                confirmed=result.confirmed,
                compensated=result.compensated,
                unresolved=result.unresolved,
            )
        return result

    def start(self) -> None:
        self._stop.clear()
        self._task = asyncio.create_task(self._run(), name="topup-reconciler")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await self.reconcile()
            except Exception as error:  # the database may be down: try again next round
                _log.warning("top-up reconciliation failed", error=repr(error))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._interval.total_seconds())
