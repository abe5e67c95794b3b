"""What users see of their promotions and vouchers, and public voucher validation.

Reads first store ``expired`` on the vouchers concerned that are past their expiry, so what
is shown is also what is stored.
"""

from __future__ import annotations

from dataclasses import dataclass

from cake_common.errors import NotFound

from cake_promotions.domain.campaigns import Campaign
from cake_promotions.domain.enrollment import Participation, is_in_first_hundred
from cake_promotions.domain.vouchers import VOUCHER_NOT_FOUND, VoucherView, view_voucher
from cake_promotions.service.clock import Clock, utc_now
from cake_promotions.service.ports import UnitOfWorkFactory


@dataclass(frozen=True, slots=True)
class PromotionSummary:
    """One entry of ``my-promotions``."""

    participation: Participation
    campaign: Campaign
    is_in_first_hundred: bool
    vouchers: list[VoucherView]


class VoucherQueries:
    def __init__(self, uow_factory: UnitOfWorkFactory, *, clock: Clock = utc_now) -> None:
        self._uow_factory = uow_factory
        self._clock = clock

    async def my_vouchers(self, user_id: int) -> list[VoucherView]:
        now = self._clock()
        async with self._uow_factory() as uow:
            await uow.vouchers.expire_overdue(now, user_id=user_id)
            vouchers = await uow.vouchers.list_for_user(user_id)
            await uow.commit()
        return [view_voucher(voucher, now) for voucher in vouchers]

    async def my_promotions(self, user_id: int) -> list[PromotionSummary]:
        now = self._clock()
        async with self._uow_factory() as uow:
            await uow.vouchers.expire_overdue(now, user_id=user_id)
            participations = await uow.participations.list_for_user(user_id)
            vouchers = await uow.vouchers.list_for_participations(
                [participation.id for participation, _ in participations]
            )
            await uow.commit()
        return [
            PromotionSummary(
                participation=participation,
                campaign=campaign,
                is_in_first_hundred=is_in_first_hundred(participation, campaign),
                vouchers=[
                    view_voucher(voucher, now)
                    for voucher in vouchers
                    if voucher.user_promotion_id == participation.id
                ],
            )
            for participation, campaign in participations
        ]

    async def validate(self, code: str) -> VoucherView:
        now = self._clock()
        async with self._uow_factory() as uow:
            await uow.vouchers.expire_overdue(now, code=code)
            voucher = await uow.vouchers.get_by_code(code)
            await uow.commit()
        if voucher is None:
            raise NotFound(VOUCHER_NOT_FOUND, reason="VOUCHER_NOT_FOUND")
        return view_voucher(voucher, now)
