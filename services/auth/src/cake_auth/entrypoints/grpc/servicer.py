"""``cake.auth.v1.AuthService``: maps messages to use cases and results back, nothing else."""

from __future__ import annotations

import base64
import binascii
import ipaddress
from dataclasses import asdict
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

import grpc
from cake.auth.v1 import auth_pb2, auth_pb2_grpc, oauth_pb2
from cake_common.auth_context import current_principal, principal_var, require_admin
from cake_common.errors import CakeError, NotFound, PermissionDenied
from cake_common.grpc_server.call_scope import metadata_value

from cake_auth.domain.login import LoginContext
from cake_auth.domain.service_accounts import ClientCredentials, invalid_client, invalid_request
from cake_auth.service.discovery import OpenIdConfiguration
from cake_auth.service.service_accounts import ServiceAccounts, TokenGrant
from cake_auth.service.use_cases import (
    AuthUseCases,
    LogIn,
    RegisterUser,
    UpdateProfile,
)
from cake_auth.user_proto import user_message, user_to_proto

AUTH_SERVICE = auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name
# Who may call each RPC is declared in the contract (option cake.access.v1.access).

FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
_TOKEN_PARAMETERS = ("grant_type", "client_id", "client_secret", "scope")
_MAX_FORM_BYTES = 4096

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


def _basic_credentials(context: Context) -> ClientCredentials | None:
    """RFC 6749 section 2.3.1: ``Basic base64(urlencode(id):urlencode(secret))``; ``None``
    without an ``authorization`` header or metadata."""
    header = metadata_value(context, "authorization")
    if header is None:
        return None
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        raise invalid_client("Client authentication must use HTTP Basic or the body")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise invalid_client("Malformed Basic credentials") from None
    client_id, separator, secret = decoded.partition(":")
    if not separator:
        raise invalid_client("Malformed Basic credentials")
    return ClientCredentials(unquote_plus(client_id), unquote_plus(secret))


def _token_parameters(request: oauth_pb2.TokenRequest) -> dict[str, str]:
    """The request's parameters: the fields (gRPC), or the form body (REST through the
    gateway: RFC 6749 section 4.4.2 asks for application/x-www-form-urlencoded)."""
    form = request.form
    if not form.content_type and not form.data:
        return {name: getattr(request, name) for name in _TOKEN_PARAMETERS}
    if any(getattr(request, name) for name in _TOKEN_PARAMETERS):
        raise invalid_request("Send the parameters in the form body or in fields, not both")
    if form.content_type.split(";")[0].strip().lower() != FORM_CONTENT_TYPE:
        raise invalid_request(f"The body must be {FORM_CONTENT_TYPE}")
    if len(form.data) > _MAX_FORM_BYTES:
        raise invalid_request("The body is too large")
    try:
        pairs = parse_qsl(
            form.data.decode(), keep_blank_values=True, strict_parsing=bool(form.data)
        )
    except (UnicodeDecodeError, ValueError):
        raise invalid_request("The body is not a valid form") from None
    parameters: dict[str, str] = {}
    for name, value in pairs:
        # RFC 6749 section 3.2: parameters MUST NOT be included more than once.
        if name in parameters:
            raise invalid_request(f"Parameter {name} is repeated")
        parameters[name] = value
    return {name: parameters.get(name, "") for name in _TOKEN_PARAMETERS}


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    def __init__(
        self,
        use_cases: AuthUseCases,
        service_accounts: ServiceAccounts,
        discovery: OpenIdConfiguration,
    ) -> None:
        self._use_cases = use_cases
        self._service_accounts = service_accounts
        self._discovery = oauth_pb2.GetOpenIdConfigurationResponse(**asdict(discovery))

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
        return auth_pb2.GetProfileResponse(user=user_message(user))

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
        principal = principal_var.get()
        if principal is not None and principal.is_service:
            raise PermissionDenied(
                "Service tokens are renewed with the client credentials grant",
                reason="ROLE_NOT_ALLOWED",
            )
        refreshed = await self._use_cases.refresh(request.refresh_token, principal)
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

    async def Token(
        self, request: oauth_pb2.TokenRequest, context: Context
    ) -> oauth_pb2.TokenResponse:
        try:
            parameters = _token_parameters(request)
            basic = _basic_credentials(context)
        except CakeError as error:
            self._service_accounts.refused(error)
            raise
        issued = await self._service_accounts.issue(
            TokenGrant(
                grant_type=parameters["grant_type"],
                client_id=parameters["client_id"],
                client_secret=parameters["client_secret"],
                scope=parameters["scope"],
                basic=basic,
            )
        )
        return oauth_pb2.TokenResponse(
            access_token=issued.token.token,
            token_type="Bearer",  # noqa: S106 (RFC 6749 section 7.1's token type, no secret)
            expires_in=issued.token.lifetime_seconds,
            scope=issued.scope,
        )

    async def GetUserContacts(
        self, request: oauth_pb2.GetUserContactsRequest, context: Context
    ) -> oauth_pb2.GetUserContactsResponse:
        user = await self._use_cases.user_contacts(request.user_id)
        if user is None:
            raise NotFound("User not found", reason="USER_NOT_FOUND")
        return oauth_pb2.GetUserContactsResponse(
            user_id=user.id, fullname=user.fullname, email=user.email, phone=user.phone
        )

    async def GetUsersContacts(
        self, request: oauth_pb2.GetUsersContactsRequest, context: Context
    ) -> oauth_pb2.GetUsersContactsResponse:
        users = await self._use_cases.users_contacts(list(request.user_ids))
        return oauth_pb2.GetUsersContactsResponse(
            contacts=[
                oauth_pb2.GetUserContactsResponse(
                    user_id=user.id, fullname=user.fullname, email=user.email, phone=user.phone
                )
                for user in users
            ]
        )

    async def GetOpenIdConfiguration(
        self, request: oauth_pb2.GetOpenIdConfigurationRequest, context: Context
    ) -> oauth_pb2.GetOpenIdConfigurationResponse:
        return self._discovery
