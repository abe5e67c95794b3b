"""The user directory: how other services reach a user (e-mail, phone, language)."""

from __future__ import annotations

from dataclasses import dataclass

from cake_common.errors import NotFound

from cake_auth.service.ports import ProfileCache, UnitOfWorkFactory

CONTACTS_SCOPE = "users:read-contacts"
"""The OAuth scope a service account needs to read users' contacts."""


@dataclass(frozen=True, slots=True)
class UserContacts:
    user_id: int
    email: str
    phone: str
    fullname: str
    preferred_language: str
    """Empty: auth keeps no language yet, the caller uses its own default."""


class UserDirectory:
    def __init__(self, unit_of_work: UnitOfWorkFactory, profile_cache: ProfileCache) -> None:
        self._unit_of_work = unit_of_work
        self._profile_cache = profile_cache

    async def contacts(self, user_id: int) -> UserContacts:
        user = await self._profile_cache.get(user_id)
        if user is None:
            async with self._unit_of_work() as uow:
                user = await uow.users.get(user_id)
            if user is None:
                raise NotFound("User not found", reason="USER_NOT_FOUND")
            await self._profile_cache.put(user)
        return UserContacts(
            user_id=user.id,
            email=user.email,
            phone=user.phone,
            fullname=user.fullname,
            preferred_language="",
        )
