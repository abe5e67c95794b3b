"""The Kafka message of an outbox row: ``cake.events.v1.EventEnvelope`` keyed by aggregate.

Pure protobuf work, no I/O. The payload is checked before it is wrapped, so a row whose
bytes do not parse as the message the event type promises never reaches consumers: it is
a poison row (retried, then dead-lettered).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cake.events.v1 import envelope_pb2, registry
from cake_common.kafka import kafka_headers
from google.protobuf.message import DecodeError

from cake_events.domain.relay import OutboxEvent, PoisonEvent

TYPE_URL_PREFIX = "type.googleapis.com/"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(slots=True)
class KafkaMessage:
    """What the producer sends: topic, key (aggregate id), value (envelope) and headers.

    Not frozen: one is built per event on the relay's hot path, and a frozen dataclass
    takes about twice as long to construct. Treat it as read-only.
    """

    topic: str
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]


class EnvelopeBuilder:
    """Turns outbox rows into Kafka messages; reusable and stateless after construction."""

    def __init__(self) -> None:
        # The event types the relay publishes, from the registry (audit-log events, kept in
        # the events database, never reach it).
        self._published: dict[str, registry.PublishedEvent[Any]] = {
            event.name: event for event in registry.PUBLISHED
        }

    def message_for(self, event: OutboxEvent, topic: str) -> KafkaMessage:
        """The message to publish; ``PoisonEvent`` if the row breaks the event contract."""
        spec = self._published.get(event.event_type)
        if spec is None:
            raise PoisonEvent(f"unknown event type {event.event_type!r}")
        expected = spec.payload_type
        if event.payload_type != expected:
            raise PoisonEvent(f"{event.event_type} carries {expected}, not {event.payload_type!r}")
        try:
            spec.payload.FromString(event.payload)
        except DecodeError as error:
            raise PoisonEvent(f"payload is not a valid {expected}: {error}") from None
        return self._message(event, topic, extra_headers=())

    def dead_letter_message_for(
        self, event: OutboxEvent, topic: str, reason: str, *, source: str
    ) -> KafkaMessage:
        """The row as it is (unchecked), for a dead-letter topic, with the registry's
        dead-letter headers: the failure reason and the origin (``outbox/<source>/<row id>``)."""
        return self._message(
            event,
            topic,
            extra_headers=(
                (registry.DEAD_LETTER_REASON_HEADER, reason.encode()),
                (registry.DEAD_LETTER_ORIGIN_HEADER, f"outbox/{source}/{event.id}".encode()),
            ),
        )

    @staticmethod
    def _message(
        event: OutboxEvent, topic: str, *, extra_headers: tuple[tuple[str, bytes], ...]
    ) -> KafkaMessage:
        # Built field by field, without intermediate messages or datetime arithmetic beyond
        # one subtraction: this runs once per event on the relay's hot path.
        event_id = event.event_id
        envelope = envelope_pb2.EventEnvelope(
            event_id=event_id,
            type=event.event_type,
            aggregate_type=event.aggregate_type,
            aggregate_id=event.aggregate_id,
            trace_parent=event.trace_parent or "",
        )
        since_epoch = event.occurred_at - _EPOCH
        occurred_at = envelope.occurred_at
        occurred_at.seconds = since_epoch.days * 86_400 + since_epoch.seconds
        occurred_at.nanos = since_epoch.microseconds * 1000
        # Packed by hand: the payload bytes already are the serialized message.
        payload = envelope.payload
        payload.type_url = TYPE_URL_PREFIX + event.payload_type
        payload.value = event.payload
        return KafkaMessage(
            topic,
            event.aggregate_id.encode(),
            envelope.SerializeToString(),
            [*kafka_headers(event_id, event.event_type, event.trace_parent), *extra_headers],
        )
