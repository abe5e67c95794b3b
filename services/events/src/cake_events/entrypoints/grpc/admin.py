"""``cake.events.v1.EventAdminService`` (admin only): maps the protos to the admin use cases."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC
from uuid import UUID

import grpc
from cake.events.v1 import admin_pb2, admin_pb2_grpc, registry
from google.protobuf.timestamp_pb2 import Timestamp

from cake_events.domain.audit import AuditFilter, StoredAuditEntry
from cake_events.domain.delivery import DeadLetter, QueueStats, SourceQueueStats, total
from cake_events.service.admin import EventAdministration

_Context = grpc.aio.ServicerContext


def cake_queues(per_source: Sequence[SourceQueueStats]) -> tuple[QueueStats, QueueStats]:
    """Cake's two queues, as ``GetQueueStatsResponse`` keeps them for its clients: user
    events are the sources whose events go to the registry's user topic, promotion events
    the sources whose events go to any other topic (a source configured without topics
    counts in neither; ``sources`` still shows it)."""
    user_topic = registry.USER_FIRST_LOGIN.topic
    users = total(item.stats for item in per_source if user_topic in item.topics)
    promotions = total(
        item.stats for item in per_source if item.topics and not set(item.topics) <= {user_topic}
    )
    return users, promotions


class EventAdminServicer(admin_pb2_grpc.EventAdminServiceServicer):
    """Queue statistics, dead letters and replay of the outbox relay."""

    def __init__(self, administration: EventAdministration) -> None:
        self._administration = administration

    async def GetQueueStats(
        self,
        request: admin_pb2.GetQueueStatsRequest,
        context: _Context[admin_pb2.GetQueueStatsRequest, admin_pb2.GetQueueStatsResponse],
    ) -> admin_pb2.GetQueueStatsResponse:
        per_source = await self._administration.queue_stats()
        users, promotions = cake_queues(per_source)
        return admin_pb2.GetQueueStatsResponse(
            user_events=_queue_stats(users),
            promotion_events=_queue_stats(promotions),
            sources=[
                admin_pb2.SourceQueueStats(
                    source=item.source, topics=item.topics, stats=_queue_stats(item.stats)
                )
                for item in per_source
            ],
        )

    async def RetryFailed(
        self,
        request: admin_pb2.RetryFailedRequest,
        context: _Context[admin_pb2.RetryFailedRequest, admin_pb2.RetryFailedResponse],
    ) -> admin_pb2.RetryFailedResponse:
        retried = await self._administration.retry_failed()
        return admin_pb2.RetryFailedResponse(retried_count=retried)

    async def ListDeadLetters(
        self,
        request: admin_pb2.ListDeadLettersRequest,
        context: _Context[admin_pb2.ListDeadLettersRequest, admin_pb2.ListDeadLettersResponse],
    ) -> admin_pb2.ListDeadLettersResponse:
        page = await self._administration.list_dead_letters(request.page_size, request.page_token)
        return admin_pb2.ListDeadLettersResponse(
            dead_letters=[_dead_letter(letter) for letter in page.dead_letters],
            next_page_token=page.next_page_token,
        )

    async def ReplayEvent(
        self,
        request: admin_pb2.ReplayEventRequest,
        context: _Context[admin_pb2.ReplayEventRequest, admin_pb2.ReplayEventResponse],
    ) -> admin_pb2.ReplayEventResponse:
        # The validation interceptor already checked that event_id is a UUID.
        event_id = UUID(request.event_id)
        status = await self._administration.replay_event(event_id)
        return admin_pb2.ReplayEventResponse(event_id=str(event_id), status=status.value)

    async def ListAuditEvents(
        self,
        request: admin_pb2.ListAuditEventsRequest,
        context: _Context[admin_pb2.ListAuditEventsRequest, admin_pb2.ListAuditEventsResponse],
    ) -> admin_pb2.ListAuditEventsResponse:
        where = AuditFilter(
            type=request.type,
            user_id=request.user_id,
            since=request.since.ToDatetime(tzinfo=UTC) if request.HasField("since") else None,
            until=request.until.ToDatetime(tzinfo=UTC) if request.HasField("until") else None,
        )
        page = await self._administration.list_audit_events(
            where, request.page_size, request.page_token
        )
        return admin_pb2.ListAuditEventsResponse(
            audit_events=[_audit_event(entry) for entry in page.entries],
            next_page_token=page.next_page_token,
        )


_INT32_MAX = 2**31 - 1


def _queue_stats(stats: QueueStats) -> admin_pb2.QueueStats:
    # The contract's counts are int32; saturate rather than fail on a huge audit log.
    return admin_pb2.QueueStats(
        waiting=min(stats.waiting, _INT32_MAX),
        active=min(stats.active, _INT32_MAX),
        completed=min(stats.completed, _INT32_MAX),
        failed=min(stats.failed, _INT32_MAX),
    )


def _dead_letter(letter: DeadLetter) -> admin_pb2.DeadLetter:
    failed_at = Timestamp()
    if letter.failed_at is not None:
        failed_at.FromDatetime(letter.failed_at)
    return admin_pb2.DeadLetter(
        event_id=str(letter.event_id),
        type=letter.event_type,
        aggregate_id=letter.aggregate_id,
        topic=letter.topic or "",
        source=letter.source,
        attempts=letter.attempts,
        last_error=letter.last_error,
        failed_at=failed_at,
    )


def _audit_event(entry: StoredAuditEntry) -> admin_pb2.AuditEvent:
    occurred_at = Timestamp()
    occurred_at.FromDatetime(entry.occurred_at)
    return admin_pb2.AuditEvent(
        id=str(entry.event_id),
        source=entry.source,
        type=entry.type,
        actor_user_id=entry.actor_user_id,
        subject_user_id=entry.subject_user_id,
        client_ip=entry.client_ip,
        details=entry.details,
        occurred_at=occurred_at,
    )
