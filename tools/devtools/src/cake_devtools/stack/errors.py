"""The one exception type the stack raises for problems a user can act on."""

from __future__ import annotations


class StackError(RuntimeError):
    """A component could not be started, reached or stopped; the message says what to do."""
