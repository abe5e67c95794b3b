"""``CakeError`` → ``google.rpc.Status`` (AIP-193) and aborting a call with it."""

from __future__ import annotations

import re
from typing import Any, NoReturn

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from cake_common.errors import ERROR_DOMAIN, CakeError, InvalidArgument
from cake_common.logging import request_id_var

_SNAKE_SEGMENT = re.compile(r"_([a-z0-9])")


def json_field_path(path: str) -> str:
    """``end_date`` → ``endDate``, ``items[0].sku_id`` → ``items[0].skuId``.

    Violations name fields the way the proto3 JSON mapping does (lowerCamelCase), which is
    what REST clients send and read; Cake's contracts use no custom ``json_name`` on request
    fields, so the default mapping is exact.
    """
    return _SNAKE_SEGMENT.sub(lambda match: match.group(1).upper(), path)


def rich_status_for(error: CakeError) -> status_pb2.Status:
    """The status clients receive: ErrorInfo, BadRequest for invalid arguments, RequestInfo."""
    status = status_pb2.Status(code=error.code.value[0], message=error.message)
    status.details.add().Pack(
        error_details_pb2.ErrorInfo(
            reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata
        )
    )
    if isinstance(error, InvalidArgument) and error.violations:
        status.details.add().Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=json_field_path(violation.field),
                        description=violation.description,
                    )
                    for violation in error.violations
                ]
            )
        )
    request_id = request_id_var.get()
    if request_id is not None:
        # Lets a client quote the id that appears in our logs when reporting a failure.
        status.details.add().Pack(error_details_pb2.RequestInfo(request_id=request_id))
    return status


RETRY_AFTER_METADATA_KEY = "retry-after"


async def abort_with_status(
    context: grpc.aio.ServicerContext[Any, Any],
    status: status_pb2.Status,
    *,
    retry_after_seconds: int | None = None,
) -> NoReturn:
    """End the call with ``status``, carried in ``grpc-status-details-bin`` (and a
    ``retry-after`` header when ``retry_after_seconds`` is given)."""
    grpc_status = rpc_status.to_status(status)
    trailing = tuple(grpc_status.trailing_metadata)
    if retry_after_seconds is not None:
        trailing += ((RETRY_AFTER_METADATA_KEY, str(retry_after_seconds)),)
    await context.abort(grpc_status.code, grpc_status.details, trailing)


async def abort_with_error(
    context: grpc.aio.ServicerContext[Any, Any], error: CakeError
) -> NoReturn:
    """End the call with the rich status that represents ``error``."""
    await abort_with_status(
        context, rich_status_for(error), retry_after_seconds=error.retry_after_seconds
    )
