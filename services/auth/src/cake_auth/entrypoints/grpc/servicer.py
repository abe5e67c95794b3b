"""``cake.auth.v1.AuthService``: maps messages to use cases and results back, nothing else."""

from __future__ import annotations

import ipaddress
from typing import Any

import grpc
from cake.auth.v1 import auth_pb2, auth_pb2_grpc
from cake_common.auth_context import current_principal, principal_var, require_admin
from cake_common.grpc_server.call_scope import metadata_value

from cake_auth.domain.login import LoginContext
from cake_auth.service.use_cases import (
    AuthUseCases,
    LogIn,
    RegisterUser,
    UpdateProfile,
)
from cake_auth.user_proto import user_to_proto

AUTH_SERVICE = auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name
PUBLIC_METHODS = tuple(f"/{AUTH_SERVICE}/{name}" for name in ("Register", "Login", "GetJwks"))
#: A bearer token is optional (the refresh token may be in the body) but checked if present.
OPTIONAL_TOKEN_METHODS = (f"/{AUTH_SERVICE}/RefreshToken",)

USER_AGENT_METADATA_KEY = "user-agent"
CLIENT_IP_METADATA_KEY = "x-cake-client-ip"  # set by the gateway from the connection

# Kept in the USER_FIRST_LOGIN event: bounded so a client cannot bloat the outbox.
_MAX_USER_AGENT_LENGTH = 512

Context = grpc.aio.ServicerContext[Any, Any]


def _login_context(context: Context) -> LoginContext:
    user_agent = (metadata_value(context, USER_AGENT_METADATA_KEY) or "")[:_MAX_USER_AGENT_LENGTH]
    client_ip = metadata_value(context, CLIENT_IP_METADATA_KEY) or ""
    try:
        client_ip = str(ipaddress.ip_address(client_ip.strip())) if client_ip else ""
    except ValueError:
        client_ip = ""
    return LoginContext(user_agent=user_agent, client_ip=client_ip)


def _present(request: Any, field: str) -> str | None:
    value: str | None = getattr(request, field) if request.HasField(field) else None
    return value


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, use_cases: AuthUseCases) -> None:
        self._use_cases = use_cases

    async def Register(
        self, request: auth_pb2.RegisterRequest, context: Context
    ) -> auth_pb2.RegisterResponse:
        registered = await self._use_cases.register(
            RegisterUser(
                fullname=request.fullname,
                email=request.email,
                username=request.username,
                phone=request.phone,
                password=request.password,
                birthday=request.birthday,
            )
        )
        return auth_pb2.RegisterResponse(
            access_token=registered.token.token,
            user=user_to_proto(registered.user),
            refresh_token=registered.refresh_token,
            expires_in=registered.token.lifetime_seconds,
        )

    async def Login(
        self, request: auth_pb2.LoginRequest, context: Context
    ) -> auth_pb2.LoginResponse:
        logged_in = await self._use_cases.login(
            LogIn(
                account=request.account,
                password=request.password,
                context=_login_context(context),
            )
        )
        return auth_pb2.LoginResponse(
            access_token=logged_in.token.token,
            user=user_to_proto(logged_in.user),
            refresh_token=logged_in.refresh_token,
            expires_in=logged_in.token.lifetime_seconds,
        )

    async def GetProfile(
        self, request: auth_pb2.GetProfileRequest, context: Context
    ) -> auth_pb2.GetProfileResponse:
        user = await self._use_cases.get_profile(current_principal())
        return auth_pb2.GetProfileResponse(user=user_to_proto(user))

    async def UpdateProfile(
        self, request: auth_pb2.UpdateProfileRequest, context: Context
    ) -> auth_pb2.UpdateProfileResponse:
        user = await self._use_cases.update_profile(
            current_principal(),
            UpdateProfile(
                fullname=_present(request, "fullname"),
                email=_present(request, "email"),
                phone=_present(request, "phone"),
                birthday=_present(request, "birthday"),
            ),
        )
        return auth_pb2.UpdateProfileResponse(user=user_to_proto(user))

    async def RefreshToken(
        self, request: auth_pb2.RefreshTokenRequest, context: Context
    ) -> auth_pb2.RefreshTokenResponse:
        refreshed = await self._use_cases.refresh(request.refresh_token, principal_var.get())
        return auth_pb2.RefreshTokenResponse(
            access_token=refreshed.token.token,
            refresh_token=refreshed.refresh_token,
            expires_in=refreshed.token.lifetime_seconds,
        )

    async def Logout(
        self, request: auth_pb2.LogoutRequest, context: Context
    ) -> auth_pb2.LogoutResponse:
        await self._use_cases.logout(current_principal())
        return auth_pb2.LogoutResponse()

    async def LogoutAll(
        self, request: auth_pb2.LogoutAllRequest, context: Context
    ) -> auth_pb2.LogoutAllResponse:
        ended = await self._use_cases.logout_all(current_principal())
        return auth_pb2.LogoutAllResponse(ended_sessions=ended)

    async def EndUserSessions(
        self, request: auth_pb2.EndUserSessionsRequest, context: Context
    ) -> auth_pb2.EndUserSessionsResponse:
        ended = await self._use_cases.end_user_sessions(require_admin(), request.user_id)
        return auth_pb2.EndUserSessionsResponse(ended_sessions=ended)

    async def GetJwks(
        self, request: auth_pb2.GetJwksRequest, context: Context
    ) -> auth_pb2.GetJwksResponse:
        return auth_pb2.GetJwksResponse(
            keys=[
                auth_pb2.Jwk(
                    kty=key.get("kty", ""),
                    crv=key.get("crv", ""),
                    x=key.get("x", ""),
                    y=key.get("y", ""),
                    kid=key.get("kid", ""),
                    use=key.get("use", "sig"),
                    alg=key.get("alg", "ES256"),
                )
                for key in self._use_cases.published_keys()
            ]
        )
