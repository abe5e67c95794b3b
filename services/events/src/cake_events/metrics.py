"""Prometheus metrics of the outbox relay.

Built on the registry the composition root passes (the process-wide default in the
service, a fresh one per test), never at import.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class RelayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        source_topic = ("source", "topic")
        self.published = Counter(
            "cake_events_relay_published",
            "Events published to Kafka and acknowledged",
            source_topic,
            registry=registry,
        )
        self.failed_attempts = Counter(
            "cake_events_relay_failed_attempts",
            "Publication attempts that failed for the event itself (retried with backoff)",
            source_topic,
            registry=registry,
        )
        self.dead_lettered = Counter(
            "cake_events_relay_dead_lettered",
            "Events parked as dead letters after their last allowed attempt",
            source_topic,
            registry=registry,
        )
        self.dead_letter_publish_failures = Counter(
            "cake_events_relay_dead_letter_publish_failures",
            "Dead letters not copied to their dead-letter topic (kept in the database)",
            ("source",),
            registry=registry,
        )
        self.kafka_unavailable = Counter(
            "cake_events_relay_kafka_unavailable",
            "Batches cut short because Kafka was unreachable (no attempt counted)",
            ("source",),
            registry=registry,
        )
        self.order_broken = Counter(
            "cake_events_relay_order_broken",
            "Aggregates whose later event was acknowledged after an earlier one failed in Kafka",
            ("source",),
            registry=registry,
        )
        self.backlog = Gauge(
            "cake_events_outbox_backlog",
            "Outbox rows waiting for publication (dead letters excluded)",
            ("source",),
            registry=registry,
        )
        self.lag_seconds = Gauge(
            "cake_events_outbox_lag_seconds",
            "Age of the oldest outbox row waiting for publication",
            ("source",),
            registry=registry,
        )
        self.active = Gauge(
            "cake_events_relay_active",
            "1 while this replica is the active relay of the source, 0 on standby",
            ("source",),
            registry=registry,
        )
