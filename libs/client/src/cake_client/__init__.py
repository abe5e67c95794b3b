"""Cake's gRPC API for Python callers: ``connect(target, tokens=...)`` gives typed stubs on a
channel with deadlines and retries (a gRPC service config) and bearer tokens."""

from cake_client.client import PUBLIC_METHODS, CakeClient, connect
from cake_client.service_config import service_config, service_config_json
from cake_client.tokens import ClientCredentials, PasswordSession, StaticToken, TokenProvider

__all__ = [
    "PUBLIC_METHODS",
    "CakeClient",
    "ClientCredentials",
    "PasswordSession",
    "StaticToken",
    "TokenProvider",
    "connect",
    "service_config",
    "service_config_json",
]
