"""Domain objects → ``cake.promotions.v1`` messages.

Money and percentages leave as ``double`` (JSON numbers, as the Cake clients expect): a
2-decimal amount below 10^12 has at most 14 significant digits, which a double round-trips
exactly through its shortest representation.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from cake.promotions.v1 import campaign_pb2, promotions_pb2, voucher_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from cake_promotions.domain.campaigns import Campaign
from cake_promotions.domain.enrollment import Eligibility, EnrollmentOutcome
from cake_promotions.domain.vouchers import VoucherView, view_voucher
from cake_promotions.service.vouchers import PromotionSummary


def timestamp(instant: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(instant)
    return stamp


def from_timestamp(stamp: Timestamp) -> datetime:
    return stamp.ToDatetime(tzinfo=UTC)


def _number(amount: Decimal | None) -> float:
    # Uncapped (None) reads as 0, as documented on the contract's max_discount_amount.
    return float(amount) if amount is not None else 0.0


def campaign_message(campaign: Campaign, now: datetime) -> campaign_pb2.Campaign:
    terms = campaign.terms
    return campaign_pb2.Campaign(
        id=campaign.id,
        name=campaign.name,
        description=campaign.description,
        type=campaign.type,
        status=campaign.status_at(now).value,
        start_date=timestamp(campaign.start_date),
        end_date=timestamp(campaign.end_date),
        max_participants=campaign.max_participants,
        current_participants=campaign.current_participants,
        discount_percentage=_number(terms.discount_percentage),
        min_topup_amount=_number(terms.min_topup_amount),
        max_discount_amount=_number(terms.max_discount_amount),
        voucher_validity_days=terms.voucher_validity_days,
        remaining_slots=campaign.remaining_slots,
        created_at=timestamp(campaign.created_at),
        updated_at=timestamp(campaign.updated_at),
    )


def voucher_message(view: VoucherView, *, for_owner: bool = True) -> voucher_pb2.Voucher:
    """``for_owner=False`` (the anonymous voucher check) leaves out the payment's
    transaction reference: anyone holding a code may ask, only the owner may see it."""
    voucher = view.voucher
    message = voucher_pb2.Voucher(
        id=voucher.id,
        code=voucher.code,
        type=voucher.type,
        status=view.status.value,
        discount_percentage=_number(voucher.discount_percentage),
        min_topup_amount=_number(voucher.min_topup_amount),
        max_discount_amount=_number(voucher.max_discount_amount),
        issued_at=timestamp(voucher.issued_at),
        expires_at=timestamp(voucher.expires_at),
        is_valid=view.is_valid,
        is_expired=view.is_expired,
    )
    if voucher.used_at is not None:
        message.used_at.CopyFrom(timestamp(voucher.used_at))
    if voucher.used_amount is not None:
        message.used_amount = float(voucher.used_amount)
    if voucher.discount_amount is not None:
        message.discount_amount = float(voucher.discount_amount)
    if for_owner and voucher.transaction_reference is not None:
        message.transaction_reference = voucher.transaction_reference
    return message


def promotion_message(summary: PromotionSummary) -> voucher_pb2.UserPromotion:
    participation = summary.participation
    message = voucher_pb2.UserPromotion(
        id=participation.id,
        campaign_id=participation.campaign_id,
        campaign_name=summary.campaign.name,
        status=participation.status.value,
        first_login_at=timestamp(participation.first_login_at),
        participation_order=participation.participation_order,
        is_in_first_hundred=summary.is_in_first_hundred,
        vouchers=[voucher_message(view) for view in summary.vouchers],
        created_at=timestamp(participation.created_at),
    )
    if participation.voucher_issued_at is not None:
        message.voucher_issued_at.CopyFrom(timestamp(participation.voucher_issued_at))
    if participation.voucher_used_at is not None:
        message.voucher_used_at.CopyFrom(timestamp(participation.voucher_used_at))
    return message


def track_first_login_response(
    outcome: EnrollmentOutcome, now: datetime
) -> promotions_pb2.TrackFirstLoginResponse:
    response = promotions_pb2.TrackFirstLoginResponse(
        eligible=outcome.eligible, message=outcome.message
    )
    if outcome.campaign is not None:
        response.campaign_id = outcome.campaign.id
        response.campaign_name = outcome.campaign.name
        response.remaining_slots = outcome.campaign.remaining_slots
    if outcome.participation is not None:
        response.participation_order = outcome.participation.participation_order
    if outcome.voucher is not None:
        response.voucher.CopyFrom(voucher_message(view_voucher(outcome.voucher, now)))
    return response


def eligibility_response(eligibility: Eligibility) -> promotions_pb2.GetEligibilityResponse:
    response = promotions_pb2.GetEligibilityResponse(
        eligible=eligibility.eligible, message=eligibility.message
    )
    if eligibility.campaign is not None:
        response.campaign_id = eligibility.campaign.id
        response.campaign_name = eligibility.campaign.name
        response.remaining_slots = eligibility.campaign.remaining_slots
    return response
