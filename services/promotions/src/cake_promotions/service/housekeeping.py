"""Periodic clean-up: top-up idempotency keys are remembered for a retention, then deleted."""

from __future__ import annotations

import asyncio
import contextlib

from cake_common.logging import get_logger

from cake_promotions.metrics import PromotionsMetrics
from cake_promotions.service.ports import UnitOfWorkFactory

EXPIRY_CHUNK = 5000
"""Keys deleted per transaction, so a sweep never holds many row locks at once."""

_log = get_logger(__name__)


class IdempotencyKeyExpiry:
    """Deletes idempotency keys older than ``retention_seconds``, every ``interval_seconds``
    while started. Several replicas may sweep at once: each deletion is idempotent."""

    def __init__(
        self,
        uow_factory: UnitOfWorkFactory,
        metrics: PromotionsMetrics,
        *,
        retention_seconds: float,
        interval_seconds: float,
    ) -> None:
        self._uow_factory = uow_factory
        self._metrics = metrics
        self._retention_seconds = retention_seconds
        self._interval_seconds = interval_seconds
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def sweep(self) -> int:
        """Delete every key past its retention now; how many were deleted."""
        deleted = 0
        while True:
            async with self._uow_factory() as uow:
                count = await uow.idempotency_keys.delete_created_before(
                    self._retention_seconds, limit=EXPIRY_CHUNK
                )
                await uow.commit()
            deleted += count
            self._metrics.idempotency_keys_expired.inc(count)
            if count < EXPIRY_CHUNK:
                return deleted

    def start(self) -> None:
        self._stop.clear()
        self._task = asyncio.create_task(self._run(), name="idempotency-key-expiry")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                deleted = await self.sweep()
                if deleted:
                    _log.info("expired idempotency keys deleted", keys=deleted)
            except Exception as error:  # the database may be down: try again next time
                _log.warning("idempotency key sweep failed", error=repr(error))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._interval_seconds)
