"""Configuration: defaults that match the cross-service agreements, and refusing to run
without the keys that every non-public call is checked against."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
from cake_common.token_auth import required_token_verifier
from cake_promotions.bootstrap import payment_gateway
from cake_promotions.domain.payments import PaymentRequest
from cake_promotions.domain.topups import PaymentOutcome
from cake_promotions.settings import PromotionsSettings

URL = "postgresql+psycopg://cake_promotions:secret@127.0.0.1:5432/cake_promotions"


def settings(**values: object) -> PromotionsSettings:
    return PromotionsSettings(database_url=URL, **values)  # type: ignore[arg-type]


def test_defaults_follow_the_agreements() -> None:
    configured = settings()
    assert configured.user_events_topic == "cake.auth.user.v1"
    assert configured.consumer_group == "promotions"
    assert configured.consumer_enabled
    assert (configured.jwt_issuer, configured.jwt_audience) == ("cake-system", "cake-users")
    assert not configured.payment_fail


def test_shared_field_groups_keep_the_promotions_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert (settings().relay_role, settings().consumer_max_batch) == ("cake_relay", 500)
    monkeypatch.setenv("CAKE_PROMOTIONS_RELAY_ROLE", "relay_two")
    monkeypatch.setenv("CAKE_PROMOTIONS_CONSUMER_MAX_BATCH", "20000")  # no upper bound here
    monkeypatch.setenv("CAKE_PROMOTIONS_CONSUMER_RETRY_MAX_SECONDS", "4")
    configured = settings()
    assert configured.relay_role == "relay_two"
    assert configured.consumer_max_batch == 20_000
    assert configured.consumer_retry_max_seconds == 4.0


def test_environment_configures_the_simulated_bank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAKE_PROMOTIONS_PAYMENT_FAIL_AMOUNT", "13.13")
    configured = settings()
    assert configured.payment_fail_amount == Decimal("13.13")
    monkeypatch.setenv("CAKE_PROMOTIONS_PAYMENT_FAIL", "true")
    assert settings().payment_fail


async def test_payment_failure_switch_reaches_the_gateway() -> None:
    request = PaymentRequest("TXN-1", 1, "+8490", Decimal(1), Decimal(1), "bank_transfer")
    assert (await payment_gateway(settings()).charge(request)).outcome is PaymentOutcome.CHARGED
    assert (
        await payment_gateway(settings(payment_fail=True)).charge(request)
    ).outcome is PaymentOutcome.NOT_CHARGED


def test_serving_without_a_jwks_file_is_refused() -> None:
    with pytest.raises(SystemExit, match="CAKE_PROMOTIONS_JWKS_FILE"):
        required_token_verifier(settings())


def test_a_jwks_file_gives_a_verifier(tmp_path: Path) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text('{"keys": []}')
    assert required_token_verifier(settings(jwks_file=jwks)) is not None
