"""Field rules and normalisation of users (pure functions, no I/O)."""

from __future__ import annotations

from datetime import date, timedelta

import pytest
from cake_auth.domain.users import (
    PASSWORD_MAX_BYTES,
    Role,
    field_taken,
    new_user,
    normalise_email,
    normalise_phone,
    password_problem,
    profile_changes,
    username_key,
)
from cake_common.errors import AlreadyExists, InvalidArgument
from hypothesis import given
from hypothesis import strategies as st

TODAY = date(2026, 11, 25)

VALID = {
    "fullname": "  Ada Lovelace ",
    "email": " Ada@Example.COM ",
    "username": "Ada_L",
    "phone": "+84 912-345-678",
    "password": "secret-password",
    "birthday": "1990-02-28",
}


def _violations(error: InvalidArgument) -> dict[str, str]:
    return {violation.field: violation.description for violation in error.violations}


def test_new_user_is_normalised() -> None:
    user = new_user(**VALID, today=TODAY)
    assert user.fullname == "Ada Lovelace"
    assert user.email == "ada@example.com"
    assert user.username == "Ada_L"  # the user's casing is kept
    assert user.phone == "+84912345678"
    assert user.birthday == date(1990, 2, 28)
    assert user.role is Role.USER


@pytest.mark.parametrize(
    ("birthday", "description"),
    [
        ("2001-02-29", "must be a real date in YYYY-MM-DD format"),
        ("2000-13-01", "must be a real date in YYYY-MM-DD format"),
        ("0000-01-01", "must be a real date in YYYY-MM-DD format"),
        ("2026-11-25", "must be in the past"),  # today is not in the past
        ("2026-11-26", "must be in the past"),
        ("9999-12-31", "must be in the past"),
    ],
)
def test_birthday_must_be_a_real_past_date(birthday: str, description: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        new_user(**{**VALID, "birthday": birthday}, today=TODAY)
    assert _violations(caught.value) == {"birthday": description}


def test_leap_day_and_yesterday_are_accepted() -> None:
    assert new_user(**{**VALID, "birthday": "2000-02-29"}, today=TODAY).birthday == date(
        2000, 2, 29
    )
    yesterday = (TODAY - timedelta(days=1)).isoformat()
    assert new_user(**{**VALID, "birthday": yesterday}, today=TODAY).birthday is not None


def test_every_bad_field_is_reported_once() -> None:
    with pytest.raises(InvalidArgument) as caught:
        new_user(
            **{
                **VALID,
                "fullname": "Ada\x00",
                "password": "é" * 37,  # 74 bytes in UTF-8, only 37 characters
                "birthday": "2030-01-01",
            },
            today=TODAY,
        )
    assert caught.value.message == "Validation failed"
    assert sorted(_violations(caught.value)) == ["birthday", "fullname", "password"]
    assert len(caught.value.violations) == 3


def test_password_limits() -> None:
    assert password_problem("a" * PASSWORD_MAX_BYTES) is None
    assert password_problem("a" * (PASSWORD_MAX_BYTES + 1)) == "must be at most 72 bytes in UTF-8"
    assert password_problem("€" * 24) is None  # exactly 72 bytes
    assert password_problem("€" * 25) is not None
    assert password_problem("abc\x00def") == "must not contain NUL characters"


def test_admin_without_birthday() -> None:
    admin = new_user(**{**VALID, "birthday": None}, today=TODAY, role=Role.ADMIN)
    assert admin.birthday is None
    assert admin.role is Role.ADMIN


def test_profile_changes_keep_absent_fields_absent() -> None:
    changes = profile_changes(
        fullname=None, email=" New@Mail.Example ", phone=None, birthday=None, today=TODAY
    )
    assert changes.email == "new@mail.example"
    assert (changes.fullname, changes.phone, changes.birthday) == (None, None, None)
    assert not changes.is_empty
    assert profile_changes(
        fullname=None, email=None, phone=None, birthday=None, today=TODAY
    ).is_empty


def test_profile_changes_follow_registration_rules() -> None:
    with pytest.raises(InvalidArgument) as caught:
        profile_changes(
            fullname="x\x00", email=None, phone="0912\x00", birthday="2027-01-01", today=TODAY
        )
    assert sorted(_violations(caught.value)) == ["birthday", "fullname", "phone"]


@pytest.mark.parametrize(
    ("field", "message", "reason"),
    [
        ("username", "Username already exists", "USERNAME_TAKEN"),
        ("email", "Email already exists", "EMAIL_TAKEN"),
        ("phone", "Phone number already exists", "PHONE_TAKEN"),
    ],
)
def test_conflict_messages_are_cakes(field: str, message: str, reason: str) -> None:
    error = field_taken(field)
    assert isinstance(error, AlreadyExists)
    assert (error.message, error.reason, error.metadata) == (message, reason, {"field": field})


_phones = st.from_regex(r"\A\+?[0-9](?:[ -]?[0-9]){5,18}\Z")


@given(_phones)
def test_phone_normalisation_drops_only_separators(phone: str) -> None:
    normalised = normalise_phone(phone)
    assert normalised == phone.replace(" ", "").replace("-", "")
    assert normalise_phone(normalised) == normalised


@given(st.emails())
def test_email_normalisation_is_case_insensitive_and_idempotent(email: str) -> None:
    assert normalise_email(email.upper()) == normalise_email(email.lower())
    assert normalise_email(normalise_email(email)) == normalise_email(email)


@given(st.from_regex(r"\A[A-Za-z0-9_]{3,50}\Z"))
def test_username_key_ignores_case(username: str) -> None:
    assert username_key(username.upper()) == username_key(username.swapcase())


@given(st.dates(max_value=TODAY - timedelta(days=1)))
def test_any_earlier_date_is_a_valid_birthday(birthday: date) -> None:
    assert new_user(**{**VALID, "birthday": birthday.isoformat()}, today=TODAY).birthday == birthday


@given(st.dates(min_value=TODAY))
def test_no_later_date_is_a_valid_birthday(birthday: date) -> None:
    with pytest.raises(InvalidArgument):
        new_user(**{**VALID, "birthday": birthday.isoformat()}, today=TODAY)


@pytest.mark.parametrize(
    ("fullname", "problem"),
    [
        ("\u200b\u200c\u200d", "must contain at least one visible character"),
        ("\u202e\u202e", "must not contain bidirectional control characters"),
        ("\u202eelgooG", "must not contain bidirectional control characters"),
        ("Ann\u2066 Lee", "must not contain bidirectional control characters"),
        ("\u0301\u0301", "must contain at least one visible character"),
        ("\u3000\u00a0", "must contain at least one visible character"),
        ("Ann\x07Lee", "must not contain control characters"),
    ],
)
def test_invisible_or_reordering_names_are_refused(fullname: str, problem: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        new_user(**{**VALID, "fullname": fullname}, today=TODAY)
    assert _violations(caught.value) == {"fullname": problem}
    with pytest.raises(InvalidArgument):
        profile_changes(fullname=fullname, email=None, phone=None, birthday=None, today=TODAY)


@pytest.mark.parametrize("fullname", ["Nguyễn Văn An", "محمد علي", "李小龙", "O'Brien-Smith Jr."])
def test_real_names_in_any_script_are_accepted(fullname: str) -> None:
    assert new_user(**{**VALID, "fullname": fullname}, today=TODAY).fullname == fullname
