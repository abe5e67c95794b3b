"""Prometheus metrics of the promotions service.

Built by the composition root (on the process-wide registry that the metrics endpoint
exposes) or by tests (on a private registry), never at import time.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter


class PromotionsMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.enrolments = Counter(
            "cake_promotions_enrolments_total",
            "First-login enrolment attempts by outcome",
            ["result"],
            registry=registry,
        )
        self.vouchers_issued = Counter(
            "cake_promotions_vouchers_issued_total", "Vouchers issued", registry=registry
        )
        self.vouchers_used = Counter(
            "cake_promotions_vouchers_used_total", "Vouchers spent on a top-up", registry=registry
        )
        self.topups = Counter(
            "cake_promotions_topups_total",
            "Top-up requests by outcome (succeeded, rejected, payment_failed, replayed,"
            " pending: bank's answer unknown, in_progress: retried while pending)",
            ["result"],
            registry=registry,
        )
        self.topups_settled = Counter(
            "cake_promotions_topups_settled_total",
            "Pending top-ups settled, by the request or the reconciler (succeeded, failed)",
            ["result"],
            registry=registry,
        )
        self.topups_reconciled = Counter(
            "cake_promotions_topups_reconciled_total",
            "Overdue pending top-ups the reconciler confirmed, compensated or could not"
            " resolve yet (bank unreachable)",
            ["result"],
            registry=registry,
        )
        self.idempotency_keys_expired = Counter(
            "cake_promotions_idempotency_keys_expired_total",
            "Top-up idempotency keys deleted after their retention",
            registry=registry,
        )
        self.consumed_events = Counter(
            "cake_promotions_consumed_events_total",
            "Events read by the first-login consumer by outcome",
            ["result"],
            registry=registry,
        )
        self.consumer_retries = Counter(
            "cake_promotions_consumer_retries_total",
            "Attempts at an event that failed and will be retried (transient: a dependency"
            " is down; unexpected: a bug or bad data, dead-lettered after a few)",
            ["kind"],
            registry=registry,
        )
        self.consumer_restarts = Counter(
            "cake_promotions_consumer_restarts_total",
            "Times the first-login consumer loop died of an error and was restarted",
            registry=registry,
        )
        self.dead_letters = Counter(
            "cake_promotions_dead_letters_total",
            "Events the first-login consumer could never process, sent to the dead-letter topic",
            ["reason"],
            registry=registry,
        )
