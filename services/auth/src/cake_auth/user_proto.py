"""Domain ``User`` ⇄ ``cake.auth.v1.User`` (the API shape, also what the profile cache holds)."""

from __future__ import annotations

from datetime import UTC, date, datetime

from cake.auth.v1 import user_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from cake_auth.domain.users import Role, User


def _timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def user_to_proto(user: User) -> user_pb2.User:
    message = user_pb2.User(
        id=user.id,
        fullname=user.fullname,
        email=user.email,
        username=user.username,
        phone=user.phone,
        birthday=user.birthday.isoformat() if user.birthday is not None else "",
        created_at=_timestamp(user.created_at),
        updated_at=_timestamp(user.updated_at),
    )
    if user.latest_login is not None:
        message.latest_login.CopyFrom(_timestamp(user.latest_login))
    return message


def user_from_proto(message: user_pb2.User, *, role: Role, version: int) -> User:
    """The inverse of :func:`user_to_proto`; ``role`` and ``version`` are not in the API shape."""
    return User(
        id=message.id,
        fullname=message.fullname,
        email=message.email,
        username=message.username,
        phone=message.phone,
        birthday=date.fromisoformat(message.birthday) if message.birthday else None,
        role=role,
        latest_login=(
            message.latest_login.ToDatetime(tzinfo=UTC)
            if message.HasField("latest_login")
            else None
        ),
        created_at=message.created_at.ToDatetime(tzinfo=UTC),
        updated_at=message.updated_at.ToDatetime(tzinfo=UTC),
        version=version,
    )
