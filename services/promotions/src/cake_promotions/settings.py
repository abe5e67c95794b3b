"""Promotions service configuration, read from ``CAKE_PROMOTIONS_*`` environment variables."""

from __future__ import annotations

from decimal import Decimal

from cake.events.v1 import registry
from cake_common.settings import ConsumerSettings, OutboxSettings, ServiceSettings
from pydantic import Field
from pydantic_settings import SettingsConfigDict


class PromotionsSettings(ServiceSettings, OutboxSettings, ConsumerSettings):
    model_config = SettingsConfigDict(env_prefix="CAKE_PROMOTIONS_")

    service_name: str = "promotions"
    grpc_port: int = 17052

    user_events_topic: str = registry.USER_FIRST_LOGIN.topic
    """Topic of the auth service's user events (USER_FIRST_LOGIN; default from the event
    registry); its dead-letter topic (the registry's rule) takes the events that can never be
    processed."""
    consumer_group: str = "promotions"

    idempotency_key_retention_seconds: float = Field(default=86_400, gt=0)
    """How long a top-up ``Idempotency-Key`` is remembered (a retry within it replays the
    first receipt; after it the key may be used again); older keys are deleted."""
    idempotency_key_sweep_seconds: float = Field(default=300, gt=0)
    """How often ``serve`` deletes the idempotency keys past their retention."""

    payments_target: str | None = None
    """``host:port`` of the bank (``cake.payments.v1.PaymentsService``, the simulator in the
    local stack). Unset: an in-process stand-in that approves every payment."""
    payments_deadline_seconds: float = Field(default=5.0, gt=0)
    """How long one call to the bank may take; without an answer by then the top-up stays
    pending and the reconciler settles it."""
    topup_pending_timeout_seconds: float = Field(default=30.0, gt=0)
    """How long a voucher stays reserved for a pending top-up; pending top-ups older than
    this are settled by the reconciler (keep it well above the bank's deadline)."""
    reconcile_interval_seconds: float = Field(default=10.0, gt=0)
    """How often ``serve`` looks for overdue pending top-ups."""
    reconcile_enabled: bool = True
    """Whether ``serve`` runs the reconciler (any number of replicas may)."""
    fault_kill_after_charge: bool = False
    """Drills only: SIGKILL this process right after the bank answered a charge, before the
    top-up is confirmed."""

    payment_fail: bool = False
    """Make the in-process stand-in decline every payment (tests, demos)."""
    payment_fail_amount: Decimal | None = None
    """Make the in-process stand-in decline top-ups of exactly this amount."""
