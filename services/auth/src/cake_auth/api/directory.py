"""``cake.auth.v1.UserDirectoryService``: internal, never routed by the gateway."""

from __future__ import annotations

from typing import Any

import grpc
from cake.auth.v1 import directory_pb2, directory_pb2_grpc
from cake_common.auth_context import current_principal
from cake_common.errors import PermissionDenied

from cake_auth.service.directory import CONTACTS_SCOPE, UserDirectory

DIRECTORY_SERVICE = directory_pb2.DESCRIPTOR.services_by_name["UserDirectoryService"].full_name
SERVICE_ROLE = "service"

Context = grpc.aio.ServicerContext[Any, Any]


def require_contacts_reader() -> None:
    """An admin, or a service account granted :data:`CONTACTS_SCOPE`."""
    principal = current_principal()
    if principal.is_admin:
        return
    # Service tokens carry their scopes (claim `scope`); a principal type without any has none.
    scopes: frozenset[str] = getattr(principal, "scopes", frozenset())
    if principal.role == SERVICE_ROLE and CONTACTS_SCOPE in scopes:
        return
    raise PermissionDenied(
        f"A service token with scope {CONTACTS_SCOPE} is required",
        reason="SCOPE_REQUIRED",
    )


class UserDirectoryServicer(directory_pb2_grpc.UserDirectoryServiceServicer):
    def __init__(self, directory: UserDirectory) -> None:
        self._directory = directory

    async def GetUserContacts(
        self, request: directory_pb2.GetUserContactsRequest, context: Context
    ) -> directory_pb2.GetUserContactsResponse:
        require_contacts_reader()
        contacts = await self._directory.contacts(request.user_id)
        return directory_pb2.GetUserContactsResponse(
            user_id=contacts.user_id,
            email=contacts.email,
            phone=contacts.phone,
            fullname=contacts.fullname,
            preferred_language=contacts.preferred_language,
        )
