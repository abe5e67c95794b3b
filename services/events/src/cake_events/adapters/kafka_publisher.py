"""The relay's Kafka producer: idempotent, ``acks=all``, recreated after an outage."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, KafkaTimeoutError, ProducerClosed, ProducerFenced
from cake_common.kafka import create_producer
from cake_common.logging import get_logger
from cake_common.retry import RetryPolicy

from cake_events.domain.envelope import KafkaMessage

# Errors about the producer's own session rather than one message: a fresh producer (new
# producer id and sequence numbers) is the cure, so they count as an outage, not poison.
_PRODUCER_STATE_ERRORS = frozenset(
    {"OutOfOrderSequenceNumber", "UnknownProducerId", "InvalidProducerEpoch"}
)

_log = get_logger(__name__)


def broker_unavailable(error: BaseException) -> bool:
    """True if ``error`` says Kafka could not take *any* message right now (connection,
    timeout, leadership moving), as opposed to rejecting this one (too large, invalid).

    Such failures never count as attempts of a row: the rows wait for Kafka to return.
    """
    if isinstance(error, OSError | TimeoutError | KafkaTimeoutError | ProducerClosed):
        return True
    if isinstance(error, ProducerFenced) or type(error).__name__ in _PRODUCER_STATE_ERRORS:
        return True
    return isinstance(error, KafkaError) and bool(getattr(error, "retriable", False))


class KafkaPublisher:
    """Owns one producer. After Kafka was unreachable, :meth:`reset` drops it and
    :meth:`start` builds a new one once Kafka answers: a client whose connections broke is
    not trusted to recover by itself, and a new one also gets a fresh idempotent producer
    id (no sequence numbers left over from expired batches)."""

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        client_id: str,
        timeout_seconds: float,
        max_batch_bytes: int,
        linger_ms: int = 0,
        reconnect_max_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._bootstrap_servers = bootstrap_servers
        self._client_id = client_id
        self._timeout_seconds = timeout_seconds
        self._max_batch_bytes = max_batch_bytes
        self._linger_ms = linger_ms
        self._clock = clock
        self._producer: AIOKafkaProducer | None = None
        self._backoff = RetryPolicy(base_seconds=0.2, max_seconds=reconnect_max_seconds)
        self._failed_starts = 0
        self._next_start_at = 0.0

    send_errors: tuple[type[BaseException], ...] = (KafkaError, OSError)
    """What :meth:`send` raises for a message it could not hand over."""

    @staticmethod
    def unavailable(error: BaseException) -> bool:
        """:func:`broker_unavailable`: Kafka is away, as opposed to refusing this message."""
        return broker_unavailable(error)

    def _new_producer(self) -> AIOKafkaProducer:
        return create_producer(
            self._bootstrap_servers,
            self._client_id,
            request_timeout_ms=int(self._timeout_seconds * 1000),
            max_batch_size=self._max_batch_bytes,
            # The relay hands over a whole claim and then flushes it: no later message can
            # join a lingering batch, so lingering only adds to each claim's last ones.
            linger_ms=self._linger_ms,
        )

    async def start(self) -> bool:
        """Have a started producer. While Kafka is unreachable, attempts are spaced by a
        capped exponential backoff: calls before the next attempt is due return False at
        once, so the caller keeps its own rhythm (gauges, shutdown) meanwhile."""
        if self._producer is not None:
            return True
        if self._clock() < self._next_start_at:
            return False
        producer = self._new_producer()
        try:
            await asyncio.wait_for(producer.start(), self._timeout_seconds)
        except (KafkaError, OSError, TimeoutError) as error:
            await self._stop_quietly(producer)
            self._failed_starts += 1
            delay = self._backoff.delay(self._failed_starts)
            self._next_start_at = self._clock() + delay
            _log.warning(
                "kafka unreachable, will retry",
                client_id=self._client_id,
                retry_in_seconds=round(delay, 2),
                error=repr(error),
            )
            return False
        self._producer = producer
        self._failed_starts = 0
        _log.info("kafka producer started", client_id=self._client_id)
        return True

    def send(self, message: KafkaMessage) -> Awaitable[asyncio.Future[Any]]:
        """Hand ``message`` to the producer: await the result to get a future that resolves
        to its RecordMetadata once Kafka acknowledged it. Raises for messages rejected
        before sending (too large). Returns the producer's own coroutine rather than
        wrapping it in another one: this runs once per event on the relay's hot path."""
        if self._producer is None:
            raise ProducerClosed()
        sending: Awaitable[asyncio.Future[Any]] = self._producer.send(
            message.topic, message.value, key=message.key, headers=message.headers
        )
        return sending

    async def flush(self) -> bool:
        """Wait until every message handed over so far is acknowledged or failed (their
        futures are then all done): cheaper than awaiting each future of a big batch.

        False if that takes longer than twice the request timeout: aiokafka retries a batch
        already in flight for as long as the broker stays away, so without a bound an outage
        would stall the relay instead of being noticed (rows then wait in the outbox)."""
        if self._producer is None:
            return True
        try:
            await asyncio.wait_for(self._producer.flush(), 2 * self._timeout_seconds)
        except TimeoutError:
            return False
        return True

    async def reset(self) -> None:
        """Drop the producer after an outage; the next :meth:`start` makes a new one."""
        producer, self._producer = self._producer, None
        if producer is not None:
            await self._stop_quietly(producer)

    async def close(self) -> None:
        await self.reset()

    async def _stop_quietly(self, producer: AIOKafkaProducer) -> None:
        try:
            await asyncio.wait_for(producer.stop(), self._timeout_seconds)
        except Exception as error:
            _log.debug("kafka producer stop failed", error=repr(error))
