"""Prometheus metrics of the notifications service (business counters), built by the
composition root, never at import time."""

from __future__ import annotations

from cake_common.consumer import ConsumerMetrics
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from cake_notifications.domain.notifications import Channel, Kind


class PrometheusNotificationMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.consumer = ConsumerMetrics("notifications", registry)
        self._created = Counter(
            "cake_notifications_created_total",
            "Notifications created (one per event), by kind",
            ["kind"],
            registry=registry,
        )
        self._sent = Counter(
            "cake_notifications_messages_sent_total",
            "Messages handed to their channel, by channel and kind",
            ["channel", "kind"],
            registry=registry,
        )
        self._retried = Counter(
            "cake_notifications_send_retries_total",
            "Sends that failed transiently (server down) and will be retried, by channel",
            ["channel"],
            registry=registry,
        )
        self._failed = Counter(
            "cake_notifications_send_failures_total",
            "Messages refused for good (never retried), by channel",
            ["channel"],
            registry=registry,
        )
        self._skipped = Counter(
            "cake_notifications_deliveries_skipped_total",
            "Deliveries with nowhere to go (the user has no contact on the channel, or auth"
            " does not know them): a normal outcome, by channel and reason",
            ["channel", "reason"],
            registry=registry,
        )
        self._too_old = Counter(
            "cake_notifications_events_too_old_total",
            "Events older than MAX_EVENT_AGE_SECONDS (e.g. a topic's history replayed to a new"
            " consumer group): recorded in the inbox, nobody notified; by kind",
            ["kind"],
            registry=registry,
        )
        self._latency = Histogram(
            "cake_notifications_event_to_send_seconds",
            "From the event (e.g. the voucher's commit) to its message handed to the channel",
            ["channel"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=registry,
        )

    def notification_created(self, kind: Kind) -> None:
        self._created.labels(kind=kind.value).inc()

    def message_sent(self, channel: Channel, kind: Kind, seconds_since_event: float) -> None:
        self._sent.labels(channel=channel.value, kind=kind.value).inc()
        self._latency.labels(channel=channel.value).observe(seconds_since_event)

    def send_retried(self, channel: Channel) -> None:
        self._retried.labels(channel=channel.value).inc()

    def send_failed(self, channel: Channel) -> None:
        self._failed.labels(channel=channel.value).inc()

    def delivery_skipped(self, channel: Channel, reason: str) -> None:
        self._skipped.labels(channel=channel.value, reason=reason).inc()

    def event_too_old(self, kind: Kind) -> None:
        self._too_old.labels(kind=kind.value).inc()
