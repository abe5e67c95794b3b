"""Payments (bank simulator) configuration, read from ``CAKE_PAYMENTS_*`` variables."""

from __future__ import annotations

from decimal import Decimal

from cake_common.settings import ServiceSettings
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from cake_payments.domain.ledger import Fault, FaultRule


class PaymentsSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CAKE_PAYMENTS_")

    service_name: str = "payments"
    grpc_port: int = 17054

    fault: Fault | None = None
    """A fault acted out on every charge from the start (``decline``, ``error``, ``delay``,
    ``hang``, ``crash_after_charge``); the ``SetFaults`` call replaces it at run time."""
    fault_delay_ms: int = Field(default=0, ge=0, le=600_000)
    """The delay of ``fault=delay``."""
    fault_amount: Decimal | None = None
    """Act out ``fault`` only on charges of exactly this amount."""

    def fault_rules(self) -> list[FaultRule]:
        if self.fault is None:
            return []
        return [FaultRule(self.fault, delay_ms=self.fault_delay_ms, amount=self.fault_amount)]
