"""Prometheus metrics of the promotions service.

Built by the composition root (on the process-wide registry that the metrics endpoint
exposes) or by tests (on a private registry), never at import time.
"""

from __future__ import annotations

from cake_common.consumer import ConsumerMetrics
from prometheus_client import REGISTRY, CollectorRegistry, Counter


class PromotionsMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.enrollments = Counter(
            "cake_promotions_enrollments_total",
            "First-login enrollment attempts by outcome",
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
        self.consumer = ConsumerMetrics("promotions", registry)
        """The first-login consumer's counters (``cake_promotions_consumed_events_total``,
        ``..._consumer_retries_total``, ``..._consumer_restarts_total``,
        ``..._dead_letters_total``)."""
