"""The relay's Kafka producer: idempotent, ``acks=all``, recreated after an outage; it takes
each claim as whole per-partition batches (:class:`PartitionBatches`)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    ProducerClosed,
    ProducerFenced,
)
from aiokafka.partitioner import murmur2
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from cake_common.kafka import create_producer
from cake_common.logging import get_logger
from cake_common.retry import RetryPolicy

from cake_events.domain.envelope import KafkaMessage

# Errors about the producer's own session rather than one message: a fresh producer (new
# producer id and sequence numbers) is the cure, so they count as an outage, not poison.
_PRODUCER_STATE_ERRORS = frozenset(
    {"OutOfOrderSequenceNumber", "UnknownProducerId", "InvalidProducerEpoch"}
)

_MAX_REQUEST_BYTES = 1_048_576
"""The producer's ``max_request_size`` (aiokafka's default, set explicitly): a message
larger than this on its own is refused before sending, as ``send`` does."""
_SHIP_SHARE = 4
"""A batch is handed over once it holds this share of ``max_batch_bytes``: a claim fills
its partitions' batches only partly (4,000 events of ≈ 250 bytes over 6 partitions: ≈ 170
KiB each), and a batch handed over only when the claim is complete would leave Kafka idle
while the claim is handed over, then the relay idle while Kafka takes it all."""
_KEY_HASHES_KEPT = 65_536
"""Aggregate keys whose murmur2 hash is remembered (the cache is emptied when full)."""

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
        self._key_hashes: dict[bytes, int] = {}

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
            max_request_size=_MAX_REQUEST_BYTES,
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

    def batches(self) -> PartitionBatches:
        """Empty per-partition batches for one claim's messages."""
        if self._producer is None:
            raise ProducerClosed()
        return PartitionBatches(
            self._producer, self._key_hashes, ship_bytes=self._max_batch_bytes // _SHIP_SHARE
        )

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


class PartitionBatch:
    """Messages of one topic partition handed to Kafka as one produce batch: Kafka takes or
    fails them together, and acknowledges them with one future whose record metadata gives
    the batch's base offset (message *i* of the batch is at base offset + *i*)."""

    __slots__ = ("_error", "_future", "builder", "partition", "topic")

    def __init__(self, topic: str, partition: int, builder: BatchBuilder) -> None:
        self.topic = topic
        self.partition = partition
        self.builder = builder
        self._future: asyncio.Future[Any] | None = None
        self._error: BaseException | None = None

    def result(self) -> Any:
        """Kafka's record metadata of the batch (``partition``, base ``offset``); raises
        Kafka's error, the error that kept the batch from being handed over, or
        ``asyncio.InvalidStateError`` while Kafka has not answered."""
        if self._error is not None:
            raise self._error
        if self._future is None:
            raise asyncio.InvalidStateError("batch not handed to the producer")
        return self._future.result()


class PartitionBatches:
    """One claim's messages, appended to one open batch per topic partition. A batch that
    is full, or holds ``ship_bytes`` already, is handed to the producer at once
    (``send_batch``: one future per batch instead of one per message, the relay's main cost
    with ``send``); the rest by :meth:`send_all`.

    Each message goes to the partition any Kafka producer picks for its key (murmur2 of the
    key over the topic's partitions, aiokafka's ``DefaultPartitioner``), so one aggregate's
    events share a partition, and the batches of one partition are handed over in the order
    they were filled: aiokafka queues them per partition and keeps at most one produce
    request per partition in flight, retrying a batch before the next one.

    A topic's partitions come from the producer's metadata (``partitions_for``) the first
    time the claim meets the topic: aiokafka keeps that metadata cached and refreshes it
    itself (periodically, and when a send fails for an unknown partition or leader), so
    each claim sees the current partitions. A topic that does not exist fails there as
    ``send`` fails for it.
    """

    def __init__(
        self, producer: AIOKafkaProducer, key_hashes: dict[bytes, int], *, ship_bytes: int
    ) -> None:
        self._producer = producer
        self._key_hashes = key_hashes
        self._ship_bytes = ship_bytes
        self._partitions: dict[str, list[int]] = {}
        self._open: dict[tuple[str, int], PartitionBatch] = {}
        self._full: PartitionBatch | None = None
        self._broken: BaseException | None = None

    def add(self, message: Any) -> tuple[PartitionBatch, int] | None:
        """Append ``message`` (a KafkaMessage) to its partition's open batch: the batch and
        the message's index in it. None when that first needs the producer (the topic's
        partitions are not known yet, or the batch is full): then :meth:`add_waiting`.
        Raises ``MessageSizeTooLargeError`` for a message too large on its own."""
        partitions = self._partitions.get(message.topic)
        if partitions is None:
            return None
        key = message.key
        if len(message.value) + len(key) > _MAX_REQUEST_BYTES // 2:
            # Only large messages are measured: the envelope's few headers are small.
            size = DefaultRecordBatchBuilder.estimate_size_in_bytes(
                key, message.value, message.headers
            )
            if size > _MAX_REQUEST_BYTES:
                raise MessageSizeTooLargeError(
                    f"The message is {size} bytes when serialized which is larger than "
                    f"the maximum request size ({_MAX_REQUEST_BYTES} bytes)"
                )
        hashed = self._key_hashes.get(key)
        if hashed is None:
            # aiokafka's murmur2 is pure Python (3 µs a key); aggregate keys repeat a lot.
            if len(self._key_hashes) >= _KEY_HASHES_KEPT:
                self._key_hashes.clear()
            hashed = self._key_hashes[key] = murmur2(key) & 0x7FFFFFFF
        partition = partitions[hashed % len(partitions)]
        batch = self._open.get((message.topic, partition))
        if batch is None:
            batch = self._open[message.topic, partition] = PartitionBatch(
                message.topic, partition, self._producer.create_batch()
            )
        builder = batch.builder
        index = builder.record_count()
        if index and builder.size() >= self._ship_bytes:
            self._full = batch  # to be handed over now, so Kafka works meanwhile
            return None
        if builder.append(timestamp=None, key=key, value=message.value, headers=message.headers):
            return batch, index
        self._full = batch  # the builder closed itself
        return None

    async def add_waiting(self, message: Any) -> tuple[PartitionBatch, int]:
        """:meth:`add`, after learning the topic's partitions or handing the full batch of
        the message's partition to the producer. Raises what ``send`` raises when Kafka is
        away (the full batch's messages then fail with that error too)."""
        if self._broken is not None:
            raise self._broken
        if message.topic not in self._partitions:
            self._partitions[message.topic] = sorted(
                await self._producer.partitions_for(message.topic)
            )
        placed = self.add(message)
        if placed is not None:
            return placed
        # The message's partition batch is full: hand it over and start another one.
        full, self._full = self._full, None
        assert full is not None
        await self._send(full)
        placed = self.add(message)
        assert placed is not None  # an empty batch takes any message
        return placed

    async def send_all(self) -> None:
        """Hand over every batch not handed over yet (after an outage: fail them with it)."""
        for batch in list(self._open.values()):
            if self._broken is not None:
                del self._open[batch.topic, batch.partition]
                batch._error = self._broken
                continue
            with contextlib.suppress(KafkaError, OSError):  # kept on the batch
                await self._send(batch)

    async def _send(self, batch: PartitionBatch) -> None:
        """Hand ``batch`` over. If that fails, its messages fail with the error; the error
        is raised too when it says Kafka is away (nothing more is handed over then)."""
        del self._open[batch.topic, batch.partition]
        builder = batch.builder
        builder.close()
        try:
            batch._future = await self._producer.send_batch(
                builder, batch.topic, partition=batch.partition
            )
        except (KafkaError, OSError) as error:
            # aiokafka raises here when the previous batch of the partition failed before
            # it could be sent, or when the producer failed altogether.
            batch._error = error
            if broker_unavailable(error):
                self._broken = error
                raise
