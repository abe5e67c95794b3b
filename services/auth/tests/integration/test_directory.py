"""UserDirectoryService: other services read a user's contacts; users cannot."""

from __future__ import annotations

import grpc
import pytest
from cake.auth.v1 import directory_pb2, directory_pb2_grpc
from cake_auth.adapters.signing_keys import Es256TokenIssuer, load_signing_key

pytestmark = pytest.mark.integration


async def test_an_admin_token_reads_contacts(auth) -> None:  # type: ignore[no-untyped-def]
    registered = await auth.register()
    stub = directory_pb2_grpc.UserDirectoryServiceStub(auth.channel)
    contacts = await stub.GetUserContacts(
        directory_pb2.GetUserContactsRequest(user_id=registered.user.id),
        metadata=auth.bearer(auth.admin_token()),
    )
    assert (contacts.user_id, contacts.email, contacts.phone, contacts.fullname) == (
        registered.user.id,
        registered.user.email,
        registered.user.phone,
        registered.user.fullname,
    )


def user_token(auth, user_id: int) -> str:  # type: ignore[no-untyped-def]
    """A plain user's token signed with the server's own key."""
    issuer = Es256TokenIssuer(
        load_signing_key(auth.settings.jwt_private_key_file),
        issuer=auth.settings.jwt_issuer,
        audience=auth.settings.jwt_audience,
        ttl_seconds=300,
    )
    return str(issuer.issue(user_id, "user").token)


async def test_users_and_anonymous_callers_are_refused_and_unknown_ids_not_found(  # type: ignore[no-untyped-def]
    auth,
) -> None:
    registered = await auth.register()
    stub = directory_pb2_grpc.UserDirectoryServiceStub(auth.channel)
    request = directory_pb2.GetUserContactsRequest(user_id=registered.user.id)
    anonymous = await auth.failure(stub.GetUserContacts(request))
    assert anonymous.code == grpc.StatusCode.UNAUTHENTICATED
    own = user_token(auth, registered.user.id)
    refused = await auth.failure(stub.GetUserContacts(request, metadata=auth.bearer(own)))
    assert refused.code == grpc.StatusCode.PERMISSION_DENIED
    assert refused.reason == "SCOPE_REQUIRED"
    missing = await auth.failure(
        stub.GetUserContacts(
            directory_pb2.GetUserContactsRequest(user_id=2**62),
            metadata=auth.bearer(auth.admin_token()),
        )
    )
    assert missing.code == grpc.StatusCode.NOT_FOUND
    invalid = await auth.failure(
        stub.GetUserContacts(
            directory_pb2.GetUserContactsRequest(user_id=0),
            metadata=auth.bearer(auth.admin_token()),
        )
    )
    assert invalid.code == grpc.StatusCode.INVALID_ARGUMENT
