from __future__ import annotations

import jinja2
import pytest
from cake_notifications.adapters.templates import JinjaRenderer
from cake_notifications.bootstrap import TEMPLATE_SAMPLES
from cake_notifications.domain.notifications import Kind, Language


def test_every_kind_language_and_variant_renders() -> None:
    JinjaRenderer().check(TEMPLATE_SAMPLES)


@pytest.mark.parametrize("kind", list(Kind))
def test_vietnamese_and_english_differ_and_carry_the_facts(kind: Kind) -> None:
    renderer = JinjaRenderer()
    values = TEMPLATE_SAMPLES[kind]
    vi = renderer.render(kind, Language.VI, "email", values)
    en = renderer.render(kind, Language.EN, "email", values)
    assert vi != en
    fact = values.get("code") or values["transaction_id"]
    for message in (vi, en):
        assert message.subject and "\n" not in message.subject
        assert fact in message.subject + message.body


def test_voucher_email_in_vietnamese() -> None:
    message = JinjaRenderer().render(
        Kind.VOUCHER_ISSUED,
        Language.VI,
        "email",
        {**TEMPLATE_SAMPLES[Kind.VOUCHER_ISSUED], "fullname": "Nguyễn An"},
    )
    assert message.subject == "Mã giảm giá Cake CAKE-SAMPLE01: giảm 30.00%"
    assert message.body.startswith("Xin chào Nguyễn An,")


def test_failed_payment_says_nothing_was_charged() -> None:
    values = {**TEMPLATE_SAMPLES[Kind.PAYMENT_PROCESSED], "succeeded": ""}
    message = JinjaRenderer().render(Kind.PAYMENT_PROCESSED, Language.EN, "email", values)
    assert "failed" in message.subject
    assert "Nothing was charged" in message.body


def test_a_missing_fact_is_an_error_not_a_blank() -> None:
    values = dict(TEMPLATE_SAMPLES[Kind.VOUCHER_ISSUED])
    del values["code"]
    with pytest.raises(jinja2.UndefinedError):
        JinjaRenderer().render(Kind.VOUCHER_ISSUED, Language.EN, "email", values)
