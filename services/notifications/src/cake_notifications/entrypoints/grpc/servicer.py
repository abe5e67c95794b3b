"""``cake.notifications.v1.NotificationsService``: requests → use cases → responses."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from uuid import UUID

from cake.events.v1 import registry
from cake.notifications.v1 import notifications_pb2, notifications_pb2_grpc
from cake_common.auth_context import current_principal
from google.protobuf.timestamp_pb2 import Timestamp

from cake_notifications.domain.notifications import Channel, Kind, Notification, Preferences
from cake_notifications.service.inbox import UserNotifications

if TYPE_CHECKING:
    import grpc

    Context = grpc.aio.ServicerContext[Any, Any]
else:
    Context = Any

SERVICE_NAME = notifications_pb2.DESCRIPTOR.services_by_name["NotificationsService"].full_name
PUBLIC_METHODS: tuple[str, ...] = ()

#: The API names a notification's kind after the event type that caused it.
_KINDS = {
    Kind.VOUCHER_ISSUED: registry.VOUCHER_ISSUED.name,
    Kind.VOUCHER_USED: registry.VOUCHER_USED.name,
    Kind.PAYMENT_PROCESSED: registry.PAYMENT_PROCESSED.name,
}
_CHANNELS = {
    Channel.EMAIL: notifications_pb2.CHANNEL_EMAIL,
    Channel.SMS: notifications_pb2.CHANNEL_SMS,
    Channel.PUSH: notifications_pb2.CHANNEL_PUSH,
}


def notification_message(notification: Notification) -> notifications_pb2.Notification:
    message = notifications_pb2.Notification(
        id=str(notification.id),
        kind=_KINDS[notification.kind],
        title=notification.title,
        body=notification.body,
        read=notification.read,
        channels=[_CHANNELS[c] for c in notification.channels],
    )
    message.created_at.FromDatetime(notification.created_at)
    if notification.read_at is not None:
        read_at = Timestamp()
        read_at.FromDatetime(notification.read_at)
        message.read_at.CopyFrom(read_at)
    return message


def preferences_message(
    preferences: Preferences,
) -> notifications_pb2.NotificationPreferences:
    return notifications_pb2.NotificationPreferences(
        email=preferences.email,
        sms=preferences.sms,
        push=preferences.push,
        language=preferences.language_or(None).value,
    )


class NotificationsServicer(notifications_pb2_grpc.NotificationsServiceServicer):
    def __init__(self, notifications: UserNotifications) -> None:
        self._notifications = notifications

    async def ListNotifications(
        self, request: notifications_pb2.ListNotificationsRequest, context: Context
    ) -> notifications_pb2.ListNotificationsResponse:
        page = await self._notifications.list(
            current_principal().user_id,
            requested_size=request.page_size,
            page_token=request.page_token,
            unread_only=request.unread_only,
        )
        return notifications_pb2.ListNotificationsResponse(
            notifications=[notification_message(n) for n in page.notifications],
            next_page_token=page.next_page_token,
            unread_count=page.unread_count,
        )

    async def MarkNotificationRead(
        self, request: notifications_pb2.MarkNotificationReadRequest, context: Context
    ) -> notifications_pb2.MarkNotificationReadResponse:
        # The id's UUID shape is checked by the contract's validation first.
        notification = await self._notifications.mark_read(
            current_principal().user_id, UUID(request.id)
        )
        return notifications_pb2.MarkNotificationReadResponse(
            notification=notification_message(notification)
        )

    async def GetNotificationPreferences(
        self, request: notifications_pb2.GetNotificationPreferencesRequest, context: Context
    ) -> notifications_pb2.GetNotificationPreferencesResponse:
        preferences = await self._notifications.preferences(current_principal().user_id)
        return notifications_pb2.GetNotificationPreferencesResponse(
            preferences=preferences_message(preferences)
        )

    async def UpdateNotificationPreferences(
        self, request: notifications_pb2.UpdateNotificationPreferencesRequest, context: Context
    ) -> notifications_pb2.UpdateNotificationPreferencesResponse:
        preferences = await self._notifications.update_preferences(
            current_principal().user_id,
            email=request.email if request.HasField("email") else None,
            sms=request.sms if request.HasField("sms") else None,
            push=request.push if request.HasField("push") else None,
            language=request.language if request.HasField("language") else None,
        )
        return notifications_pb2.UpdateNotificationPreferencesResponse(
            preferences=preferences_message(preferences)
        )
