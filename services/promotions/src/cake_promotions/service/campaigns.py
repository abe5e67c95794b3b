"""Campaign administration (admins only) and the public campaign listing."""

from __future__ import annotations

from cake_common import audit
from cake_common.audit import AuditEntry
from cake_common.auth_context import require_admin
from cake_common.errors import NotFound
from cake_common.logging import get_logger

from cake_promotions.domain.campaigns import (
    CAMPAIGN_NOT_FOUND,
    Campaign,
    CampaignStatus,
    NewCampaign,
)
from cake_promotions.service.clock import Clock, utc_now
from cake_promotions.service.ports import UnitOfWorkFactory

_log = get_logger(__name__)


def _not_found() -> NotFound:
    return NotFound(CAMPAIGN_NOT_FOUND, reason="CAMPAIGN_NOT_FOUND")


class CampaignAdministration:
    def __init__(self, uow_factory: UnitOfWorkFactory, *, clock: Clock = utc_now) -> None:
        self._uow_factory = uow_factory
        self._clock = clock

    async def create(self, campaign: NewCampaign) -> Campaign:
        admin = require_admin()
        async with self._uow_factory() as uow:
            created = await uow.campaigns.add(campaign)
            await uow.events.security_audit(
                AuditEntry(
                    audit.CAMPAIGN_CREATED,
                    self._clock(),
                    actor_user_id=admin.user_id,
                    details={"campaign_id": str(created.id), "name": created.name[:100]},
                )
            )
            await uow.commit()
        _log.info("campaign created", campaign_id=created.id, admin_id=admin.user_id)
        return created

    async def update_status(self, campaign_id: int, status: CampaignStatus) -> Campaign:
        admin = require_admin()
        now = self._clock()
        async with self._uow_factory() as uow:
            await uow.campaigns.expire_ended(now, campaign_id)
            campaign = await uow.campaigns.get(campaign_id, for_update=True)
            if campaign is None:
                raise _not_found()
            campaign.check_status_change(status, now)
            updated = await uow.campaigns.set_status(campaign_id, status, now)
            await uow.events.security_audit(
                AuditEntry(
                    audit.CAMPAIGN_STATUS_CHANGED,
                    now,
                    actor_user_id=admin.user_id,
                    details={
                        "campaign_id": str(campaign_id),
                        "old_status": campaign.status.value,
                        "new_status": status.value,
                    },
                )
            )
            await uow.commit()
        _log.info(
            "campaign status changed",
            campaign_id=campaign_id,
            old_status=campaign.status.value,
            new_status=status.value,
            admin_id=admin.user_id,
        )
        return updated

    async def list_active(self) -> list[Campaign]:
        """Active campaigns, newest first (campaigns past their end are stored expired first)."""
        async with self._uow_factory() as uow:
            await uow.campaigns.expire_ended(self._clock())
            active = await uow.campaigns.list_with_status(CampaignStatus.ACTIVE)
            await uow.commit()
        return active

    async def get(self, campaign_id: int) -> Campaign:
        async with self._uow_factory() as uow:
            await uow.campaigns.expire_ended(self._clock(), campaign_id)
            campaign = await uow.campaigns.get(campaign_id)
            await uow.commit()
        if campaign is None:
            raise _not_found()
        return campaign
