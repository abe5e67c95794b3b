"""The local stack of real components (PostgreSQL, Redis, Kafka, the services, Envoy).

``make up`` / ``make down`` / ``make status`` run the ``cake-stack`` command (:mod:`.cli`);
the test session imports :class:`Stack` with the ``test`` profile.
"""

from cake_devtools.stack.component import ComponentStatus, State
from cake_devtools.stack.errors import StackError
from cake_devtools.stack.stack import COMPONENTS, Stack, service_environment

__all__ = ["COMPONENTS", "ComponentStatus", "Stack", "StackError", "State", "service_environment"]
