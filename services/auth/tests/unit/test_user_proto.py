"""The API message of a user, and the copy of it that profile reads share."""

from __future__ import annotations

import dataclasses
from datetime import UTC, date, datetime

from cake.auth.v1 import auth_pb2
from cake_auth import user_proto
from cake_auth.domain.users import Role, User
from cake_auth.user_proto import user_from_proto, user_message, user_to_proto

MOMENT = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


def a_user(user_id: int = 7, **changes: object) -> User:
    user = User(
        id=user_id,
        fullname="Ada Lovelace",
        email="ada@example.com",
        username="ada",
        phone="+84912345678",
        birthday=date(1990, 1, 1),
        role=Role.USER,
        latest_login=MOMENT,
        created_at=MOMENT,
        updated_at=MOMENT,
        version=3,
    )
    return dataclasses.replace(user, **changes)  # type: ignore[arg-type]


def test_the_kept_message_is_the_users_message() -> None:
    user = a_user()
    assert user_message(user) == user_to_proto(user)
    assert user_from_proto(user_message(user), role=user.role, version=user.version) == user


def test_a_changed_user_gets_its_new_message_not_the_kept_one() -> None:
    before = a_user(fullname="Ada Lovelace")
    assert user_message(before).fullname == "Ada Lovelace"
    # Same id and version, one field different (a login sets latest_login without a new
    # version): the whole user is the key, so the new value is answered.
    later = dataclasses.replace(before, latest_login=datetime(2026, 12, 6, tzinfo=UTC))
    assert user_message(later) == user_to_proto(later)
    renamed = dataclasses.replace(before, fullname="Ada King", version=4)
    assert user_message(renamed).fullname == "Ada King"


def test_a_response_built_from_it_is_a_copy() -> None:
    user = a_user(user_id=8)
    response = auth_pb2.GetProfileResponse(user=user_message(user))
    response.user.fullname = "changed by a caller"
    assert user_message(user).fullname == "Ada Lovelace"


def test_it_keeps_a_bounded_number_of_messages() -> None:
    for user_id in range(1000, 1000 + user_proto.MESSAGES_KEPT + 50):
        user_message(a_user(user_id=user_id))
    assert len(user_proto._messages) == user_proto.MESSAGES_KEPT
    # The oldest went first; the newest is kept.
    newest = a_user(user_id=1000 + user_proto.MESSAGES_KEPT + 49)
    assert newest in user_proto._messages
    assert a_user(user_id=1000) not in user_proto._messages
