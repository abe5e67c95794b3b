"""``cake.promotions.v1.PromotionsService``: requests → use cases → responses."""

from __future__ import annotations

from cake.promotions.v1 import promotions_pb2, promotions_pb2_grpc
from cake_common.auth_context import current_principal
from cake_common.grpc_server import ServicerContext, add_response_header
from cake_common.grpc_server.call_scope import metadata_value

from cake_promotions.adapters.receipts import receipt_to_proto
from cake_promotions.domain.campaigns import CampaignStatus, new_campaign
from cake_promotions.domain.money import decimal_from_number
from cake_promotions.domain.topups import DEFAULT_PAYMENT_METHOD, TopupCommand
from cake_promotions.entrypoints.grpc.mapping import (
    campaign_message,
    eligibility_response,
    from_timestamp,
    promotion_message,
    track_first_login_response,
    voucher_message,
)
from cake_promotions.service.campaigns import CampaignAdministration
from cake_promotions.service.clock import Clock, utc_now
from cake_promotions.service.enrollment import FirstLoginEnrollment
from cake_promotions.service.topups import (
    IDEMPOTENCY_KEY_FIELD,
    IDEMPOTENT_REPLAYED_HEADER,
    TopupProcessing,
)
from cake_promotions.service.vouchers import VoucherQueries

SERVICE_NAME = promotions_pb2.DESCRIPTOR.services_by_name["PromotionsService"].full_name
# Who may call each RPC (public ones too, as in the Cake System) is declared in the contract
# (option cake.access.v1.access) and enforced by the shared auth interceptor.


class PromotionsServicer(promotions_pb2_grpc.PromotionsServiceServicer):
    def __init__(
        self,
        *,
        campaigns: CampaignAdministration,
        enrollment: FirstLoginEnrollment,
        vouchers: VoucherQueries,
        topups: TopupProcessing,
        clock: Clock = utc_now,
    ) -> None:
        self._campaigns = campaigns
        self._enrollment = enrollment
        self._vouchers = vouchers
        self._topups = topups
        self._clock = clock

    async def CreateCampaign(
        self, request: promotions_pb2.CreateCampaignRequest, context: ServicerContext
    ) -> promotions_pb2.CreateCampaignResponse:
        campaign = new_campaign(
            name=request.name,
            description=request.description,
            campaign_type=request.type or None,
            start_date=from_timestamp(request.start_date),
            end_date=from_timestamp(request.end_date),
            max_participants=(
                request.max_participants if request.HasField("max_participants") else None
            ),
            discount_percentage=decimal_from_number(
                request.discount_percentage, field="discount_percentage", allow_zero=True
            ),
            min_topup_amount=decimal_from_number(
                request.min_topup_amount, field="min_topup_amount", allow_zero=True
            ),
            max_discount_amount=decimal_from_number(
                request.max_discount_amount, field="max_discount_amount", allow_zero=True
            ),
            voucher_validity_days=request.voucher_validity_days or None,
        )
        created = await self._campaigns.create(campaign)
        return promotions_pb2.CreateCampaignResponse(
            campaign=campaign_message(created, self._clock())
        )

    async def ListCampaigns(
        self, request: promotions_pb2.ListCampaignsRequest, context: ServicerContext
    ) -> promotions_pb2.ListCampaignsResponse:
        campaigns = await self._campaigns.list_active()
        now = self._clock()
        return promotions_pb2.ListCampaignsResponse(
            campaigns=[campaign_message(campaign, now) for campaign in campaigns]
        )

    async def GetCampaign(
        self, request: promotions_pb2.GetCampaignRequest, context: ServicerContext
    ) -> promotions_pb2.GetCampaignResponse:
        campaign = await self._campaigns.get(request.id)
        return promotions_pb2.GetCampaignResponse(
            campaign=campaign_message(campaign, self._clock())
        )

    async def UpdateCampaignStatus(
        self, request: promotions_pb2.UpdateCampaignStatusRequest, context: ServicerContext
    ) -> promotions_pb2.UpdateCampaignStatusResponse:
        campaign = await self._campaigns.update_status(request.id, CampaignStatus(request.status))
        return promotions_pb2.UpdateCampaignStatusResponse(
            campaign=campaign_message(campaign, self._clock())
        )

    async def TrackFirstLogin(
        self, request: promotions_pb2.TrackFirstLoginRequest, context: ServicerContext
    ) -> promotions_pb2.TrackFirstLoginResponse:
        outcome = await self._enrollment.track_first_login(current_principal().user_id)
        return track_first_login_response(outcome, self._clock())

    async def GetEligibility(
        self, request: promotions_pb2.GetEligibilityRequest, context: ServicerContext
    ) -> promotions_pb2.GetEligibilityResponse:
        eligibility = await self._enrollment.eligibility(current_principal().user_id)
        return eligibility_response(eligibility)

    async def ListMyPromotions(
        self, request: promotions_pb2.ListMyPromotionsRequest, context: ServicerContext
    ) -> promotions_pb2.ListMyPromotionsResponse:
        summaries = await self._vouchers.my_promotions(current_principal().user_id)
        return promotions_pb2.ListMyPromotionsResponse(
            promotions=[promotion_message(summary) for summary in summaries]
        )

    async def ListMyVouchers(
        self, request: promotions_pb2.ListMyVouchersRequest, context: ServicerContext
    ) -> promotions_pb2.ListMyVouchersResponse:
        views = await self._vouchers.my_vouchers(current_principal().user_id)
        return promotions_pb2.ListMyVouchersResponse(
            vouchers=[voucher_message(view) for view in views]
        )

    async def ValidateVoucher(
        self, request: promotions_pb2.ValidateVoucherRequest, context: ServicerContext
    ) -> promotions_pb2.ValidateVoucherResponse:
        view = await self._vouchers.validate(request.code)
        return promotions_pb2.ValidateVoucherResponse(
            voucher=voucher_message(view, for_owner=False)
        )

    async def Topup(
        self, request: promotions_pb2.TopupRequest, context: ServicerContext
    ) -> promotions_pb2.TopupResponse:
        command = TopupCommand(
            user_id=current_principal().user_id,
            phone_number=request.phone_number,
            amount=decimal_from_number(request.amount, field="amount"),
            voucher_code=request.voucher_code if request.HasField("voucher_code") else None,
            payment_method=(
                request.payment_method
                if request.HasField("payment_method")
                else DEFAULT_PAYMENT_METHOD
            ),
        )
        receipt = await self._topups.topup(
            command, idempotency_key=metadata_value(context, IDEMPOTENCY_KEY_FIELD)
        )
        if receipt.replayed:
            add_response_header(IDEMPOTENT_REPLAYED_HEADER, "true")
        return receipt_to_proto(receipt)
