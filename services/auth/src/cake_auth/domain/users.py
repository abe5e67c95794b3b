"""Users and the rules their fields follow, with no I/O.

Formats (e-mail syntax, username and phone patterns, lengths) are declared in the protos and
checked by protovalidate before a request reaches a use case; the rules here are the ones a
pattern cannot express (a real date in the past, bcrypt's byte limit, characters PostgreSQL
cannot store) and the normalisation that makes uniqueness case- and format-insensitive.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from datetime import date, datetime
from enum import StrEnum

from cake_common.errors import AlreadyExists, FieldViolation, InvalidArgument

VALIDATION_FAILED_MESSAGE = "Validation failed"

# bcrypt hashes at most 72 bytes of input; longer passwords are refused rather than
# silently truncated (two passwords sharing 72 bytes would otherwise be the same password).
PASSWORD_MAX_BYTES = 72

_PHONE_SEPARATORS = re.compile(r"[ -]")


class Role(StrEnum):
    USER = "user"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class User:
    """A registered user as the rest of the system may see it (no password hash)."""

    id: int
    fullname: str
    email: str
    username: str
    phone: str
    birthday: date | None
    role: Role
    latest_login: datetime | None
    created_at: datetime
    updated_at: datetime
    version: int
    """Incremented by every change of the row; orders cached copies (newest wins)."""


@dataclass(frozen=True, slots=True)
class NewUser:
    """Normalised, validated details of a user to create."""

    fullname: str
    email: str
    username: str
    phone: str
    birthday: date | None
    role: Role = Role.USER


@dataclass(frozen=True, slots=True)
class ProfileChanges:
    """Normalised, validated profile fields to change; ``None`` means unchanged."""

    fullname: str | None = None
    email: str | None = None
    phone: str | None = None
    birthday: date | None = None

    @property
    def is_empty(self) -> bool:
        return (
            self.fullname is None
            and self.email is None
            and self.phone is None
            and self.birthday is None
        )


def normalise_email(email: str) -> str:
    """E-mail addresses are unique case-insensitively and stored lower-cased."""
    return email.strip().lower()


def normalise_phone(phone: str) -> str:
    """``+84 912-345-678`` and ``+84912345678`` are one number: separators are dropped."""
    return _PHONE_SEPARATORS.sub("", phone.strip())


def username_key(username: str) -> str:
    """Usernames keep the user's casing but are unique case-insensitively."""
    return username.lower()


# Cake's conflict messages, per unique field.
_TAKEN: dict[str, tuple[str, str]] = {
    "username": ("Username already exists", "USERNAME_TAKEN"),
    "email": ("Email already exists", "EMAIL_TAKEN"),
    "phone": ("Phone number already exists", "PHONE_TAKEN"),
}
UNIQUE_FIELDS = tuple(_TAKEN)


def field_taken(field: str) -> AlreadyExists:
    """The 409 for a username, e-mail or phone number that another user already has."""
    message, reason = _TAKEN[field]
    return AlreadyExists(message, reason=reason, metadata={"field": field})


class _Violations:
    """Collects one violation per bad field, so a client sees every problem at once."""

    def __init__(self) -> None:
        self._found: dict[str, FieldViolation] = {}

    def add(self, field: str, description: str) -> None:
        self._found.setdefault(field, FieldViolation(field, description))

    def raise_if_any(self) -> None:
        if self._found:
            raise InvalidArgument(VALIDATION_FAILED_MESSAGE, list(self._found.values()))


def _check_storable(violations: _Violations, field: str, value: str) -> None:
    # PostgreSQL text cannot hold NUL; refusing it here keeps it a 400, not a database error.
    if "\x00" in value:
        violations.add(field, "must not contain NUL characters")


# Bidirectional embeddings, overrides and isolates reorder how a name is displayed
# (e.g. "\u202eelgoog" renders as "google"): never part of a genuine name.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# Categories that show nothing: controls, format characters (zero-width...), separators,
# combining marks on their own, private use and unassigned code points.
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp", "Mn", "Me"})


def _check_display_name(violations: _Violations, field: str, value: str) -> None:
    if any(character in _BIDI_CONTROLS for character in value):
        violations.add(field, "must not contain bidirectional control characters")
    elif any(unicodedata.category(character) == "Cc" for character in value):
        violations.add(field, "must not contain control characters")
    elif not any(
        unicodedata.category(character) not in _INVISIBLE_CATEGORIES for character in value
    ):
        violations.add(field, "must contain at least one visible character")


def _parse_birthday(violations: _Violations, field: str, text: str, today: date) -> date | None:
    try:
        birthday = date.fromisoformat(text)
    except ValueError:
        violations.add(field, "must be a real date in YYYY-MM-DD format")
        return None
    if birthday >= today:
        violations.add(field, "must be in the past")
        return None
    return birthday


def password_problem(password: str) -> str | None:
    """Why ``password`` can never be a stored password's plain text, or ``None``."""
    if "\x00" in password:
        return "must not contain NUL characters"
    if len(password.encode()) > PASSWORD_MAX_BYTES:
        return f"must be at most {PASSWORD_MAX_BYTES} bytes in UTF-8"
    return None


def password_is_acceptable(password: str) -> bool:
    return password_problem(password) is None


def new_user(
    *,
    fullname: str,
    email: str,
    username: str,
    phone: str,
    password: str,
    birthday: str | None,
    today: date,
    role: Role = Role.USER,
) -> NewUser:
    """Validate and normalise registration details; ``InvalidArgument`` lists every bad field.

    ``birthday`` is ``None`` only for administrators created from the command line.
    """
    violations = _Violations()
    for field, value in (
        ("fullname", fullname),
        ("email", email),
        ("username", username),
        ("phone", phone),
    ):
        _check_storable(violations, field, value)
    _check_display_name(violations, "fullname", fullname)
    problem = password_problem(password)
    if problem is not None:
        violations.add("password", problem)
    parsed_birthday = (
        None if birthday is None else _parse_birthday(violations, "birthday", birthday, today)
    )
    violations.raise_if_any()
    return NewUser(
        fullname=fullname.strip(),
        email=normalise_email(email),
        username=username.strip(),
        phone=normalise_phone(phone),
        birthday=parsed_birthday,
        role=role,
    )


def profile_changes(
    *,
    fullname: str | None,
    email: str | None,
    phone: str | None,
    birthday: str | None,
    today: date,
) -> ProfileChanges:
    """Validate and normalise the present profile fields (same rules as registration)."""
    violations = _Violations()
    for field, value in (("fullname", fullname), ("email", email), ("phone", phone)):
        if value is not None:
            _check_storable(violations, field, value)
    if fullname is not None:
        _check_display_name(violations, "fullname", fullname)
    parsed_birthday = (
        None if birthday is None else _parse_birthday(violations, "birthday", birthday, today)
    )
    violations.raise_if_any()
    return ProfileChanges(
        fullname=None if fullname is None else fullname.strip(),
        email=None if email is None else normalise_email(email),
        phone=None if phone is None else normalise_phone(phone),
        birthday=parsed_birthday,
    )
