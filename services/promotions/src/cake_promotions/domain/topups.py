"""Top-ups: the command, its receipt, transaction ids and idempotency fingerprints."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum

DEFAULT_PAYMENT_METHOD = "bank_transfer"
TOPUP_SUCCEEDED_MESSAGE = "Top-up processed successfully"
PAYMENT_FAILED_MESSAGE = "Payment processing failed"
IDEMPOTENCY_KEY_REUSED_MESSAGE = (
    "Idempotency-Key has already been used for a different top-up request"
)
MAX_IDEMPOTENCY_KEY_LENGTH = 255

_BASE36 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class TopupStatus(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class TopupCommand:
    user_id: int
    phone_number: str
    amount: Decimal
    voucher_code: str | None
    payment_method: str

    def fingerprint(self) -> str:
        """A digest of what the request asks for; a retry under the same Idempotency-Key must
        match it (the user is part of the key itself)."""
        canonical = json.dumps(
            [self.phone_number, str(self.amount), self.voucher_code, self.payment_method],
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class TopupReceipt:
    """The answer to a top-up, stored as-is for retries with the same Idempotency-Key."""

    success: bool
    transaction_id: str
    original_amount: Decimal
    discount_amount: Decimal
    final_amount: Decimal
    phone_number: str
    voucher_code: str | None
    message: str
    replayed: bool = False
    """This is the stored answer to an earlier request with the same Idempotency-Key (not
    part of the answer's body; the API says it in the ``Idempotent-Replayed`` header)."""


@dataclass(frozen=True, slots=True)
class TopupRecord:
    """A row of the top-up ledger, successful or declined."""

    transaction_id: str
    user_id: int
    phone_number: str
    original_amount: Decimal
    discount_amount: Decimal
    final_amount: Decimal
    voucher_id: int | None
    payment_method: str
    status: TopupStatus
    created_at: datetime


def new_transaction_id(now: datetime, choice: Callable[[str], str] = secrets.choice) -> str:
    """``TXN-<epoch ms>-<6 base36 characters>``, the Cake System's format."""
    millis = int(now.timestamp() * 1000)
    suffix = "".join(choice(_BASE36) for _ in range(6))
    return f"TXN-{millis}-{suffix}"
