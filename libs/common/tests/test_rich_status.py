from __future__ import annotations

import grpc
import pytest
from cake_common.errors import (
    Aborted,
    AlreadyExists,
    CakeError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from cake_common.grpc_server import abort_with_error, rich_status_for
from cake_common.logging import request_id_var
from google.rpc import error_details_pb2, status_pb2


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidArgument("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (NotFound("Campaign not found"), grpc.StatusCode.NOT_FOUND),
        (AlreadyExists("Username already exists"), grpc.StatusCode.ALREADY_EXISTS),
        (Unauthenticated("Invalid credentials"), grpc.StatusCode.UNAUTHENTICATED),
        (PermissionDenied("no"), grpc.StatusCode.PERMISSION_DENIED),
        (ResourceExhausted("slow down"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (
            FailedPrecondition("Voucher is expired or already used"),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
        (Unavailable("later"), grpc.StatusCode.UNAVAILABLE),
        (Aborted("still being processed"), grpc.StatusCode.ABORTED),
    ],
)
def test_each_error_has_its_code(error: CakeError, code: grpc.StatusCode) -> None:
    status = rich_status_for(error)
    assert status.code == code.value[0]
    assert status.message == error.message
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.domain == "cake"
    assert info.reason == code.name


def test_reason_and_metadata_carried() -> None:
    error = AlreadyExists("Email already exists", reason="EMAIL_TAKEN", metadata={"field": "email"})
    info = error_details_pb2.ErrorInfo()
    rich_status_for(error).details[0].Unpack(info)
    assert info.reason == "EMAIL_TAKEN"
    assert dict(info.metadata) == {"field": "email"}


def test_invalid_argument_carries_bad_request() -> None:
    error = InvalidArgument(
        "Validation failed",
        [FieldViolation("email", "must be an email"), FieldViolation("birthday", "required")],
    )
    status = status_pb2.Status.FromString(rich_status_for(error).SerializeToString())
    bad_request = error_details_pb2.BadRequest()
    assert any(detail.Unpack(bad_request) for detail in status.details)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        ("email", "must be an email"),
        ("birthday", "required"),
    ]


def test_request_id_included_when_known() -> None:
    token = request_id_var.set("rid-9")
    try:
        status = rich_status_for(NotFound("x"))
    finally:
        request_id_var.reset(token)
    info = error_details_pb2.RequestInfo()
    assert any(detail.Unpack(info) for detail in status.details)
    assert info.request_id == "rid-9"


def test_base_error_defaults() -> None:
    error = CakeError("boom")
    assert error.code == grpc.StatusCode.UNKNOWN
    assert error.reason == "UNKNOWN"
    assert error.metadata == {}
    assert "boom" in repr(error)


class RecordingContext:
    """Stands in for a servicer context: records what the call was aborted with."""

    def __init__(self) -> None:
        self.aborted: tuple[object, ...] = ()

    async def abort(self, code: object, details: object, trailing: object) -> None:
        self.aborted = (code, details, trailing)


async def test_retry_after_rides_in_the_trailers_only_when_given() -> None:
    later = RecordingContext()
    await abort_with_error(later, Aborted("busy", retry_after_seconds=7))  # type: ignore[arg-type]
    code, details, trailing = later.aborted
    assert (code, details) == (grpc.StatusCode.ABORTED, "busy")
    assert ("retry-after", "7") in tuple(trailing)  # type: ignore[arg-type]

    plain = RecordingContext()
    await abort_with_error(plain, Unavailable("down"))  # type: ignore[arg-type]
    assert all(key != "retry-after" for key, _ in plain.aborted[2])  # type: ignore[attr-defined]
