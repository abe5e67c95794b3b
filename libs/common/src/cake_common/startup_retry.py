"""Retrying a dependency at start-up, so services can start before their databases/brokers."""

from __future__ import annotations

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_delay,
)

from cake_common.logging import get_logger
from cake_common.retry import RetryPolicy

_log = get_logger(__name__)


def startup_retrying(
    dependency: str,
    *,
    timeout_seconds: float,
    retry_on: tuple[type[BaseException], ...],
    max_wait_seconds: float = 5.0,
) -> AsyncRetrying:
    """Cake's retry policy (:class:`RetryPolicy`: jittered, 0.2 s doubling, capped at
    ``max_wait_seconds``) until ``timeout_seconds``; each failed attempt is logged, the last
    error re-raised.

    Use as ``async for attempt in startup_retrying(...): with attempt: ...``.
    """

    def log_retry(state: RetryCallState) -> None:
        outcome = state.outcome
        error = outcome.exception() if outcome is not None else None
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        _log.warning(
            "dependency not ready, retrying",
            dependency=dependency,
            attempt=state.attempt_number,
            retry_in_seconds=round(wait, 2),
            error=repr(error),
        )

    return AsyncRetrying(
        stop=stop_after_delay(timeout_seconds),
        wait=RetryPolicy(max_seconds=max_wait_seconds).tenacity_wait(),
        retry=retry_if_exception_type(retry_on),
        before_sleep=log_retry,
        reraise=True,
    )
