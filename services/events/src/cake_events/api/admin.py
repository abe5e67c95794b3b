"""``cake.events.v1.EventAdminService`` (admin only).

Until the relay lands, every RPC answers UNIMPLEMENTED (the generated base class).
"""

from __future__ import annotations

from cake.events.v1 import admin_pb2_grpc


class EventAdminServicer(admin_pb2_grpc.EventAdminServiceServicer):
    """Queue statistics, dead letters and replay of the outbox relay."""
