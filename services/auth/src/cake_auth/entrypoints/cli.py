"""``cake-auth``: run the auth service and its operator commands.

Every command reads the service's own configuration (``CAKE_AUTH_*`` environment variables),
so ``uv run cake-auth create-admin …`` acts on the same database the service uses.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from cake.auth.v1 import auth_pb2
from cake_common.errors import CakeError, InvalidArgument, Unavailable
from cake_common.logging import configure_logging
from cake_common.migrations import run_alembic_upgrade
from cake_common.service_runtime import start_logging
from cake_common.validation import RequestValidator

from cake_auth.adapters.signing_keys import (
    JWKS_FILENAME,
    SIGNING_KEY_FILENAME,
    SigningKeyError,
    generate_key_pair,
    load_signing_key,
)
from cake_auth.bootstrap import (
    MIGRATIONS,
    open_accounts,
    open_service_accounts,
    run_event_loop,
    serve,
)
from cake_auth.domain.service_accounts import parse_scopes
from cake_auth.service.accounts import CreateAdmin
from cake_auth.settings import AuthSettings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cake-auth", description="Run the Cake auth service and its operator commands."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="migrate the database, then serve gRPC until SIGTERM")
    commands.add_parser("migrate", help="apply database migrations and exit")

    keys = commands.add_parser(
        "gen-keys",
        help=f"write a new ES256 signing key to DIR/{SIGNING_KEY_FILENAME} and publish its "
        f"public key first in DIR/{JWKS_FILENAME} (older published keys are kept)",
    )
    keys.add_argument("--dir", required=True, type=Path, help="directory of the key files")
    keys.add_argument(
        "--if-missing",
        action="store_true",
        help="do nothing if DIR already holds a signing key",
    )

    admin = commands.add_parser(
        "create-admin",
        help="create a user with the admin role, or promote the existing user with that username",
    )
    admin.add_argument("--username", required=True)
    admin.add_argument("--email", required=True)
    admin.add_argument("--phone", required=True)
    admin.add_argument("--password", required=True)
    admin.add_argument("--fullname", help="display name (default: the username)")
    admin.add_argument("--birthday", help="YYYY-MM-DD (default: none)")

    account = commands.add_parser(
        "create-service-account",
        help="create a service account (OAuth 2.0 client credentials) and print its client id "
        "and secret once; the secret is stored only as a hash",
    )
    account.add_argument("name", help="the client id: 3-63 lower-case letters, digits, dashes")
    account.add_argument(
        "--scope",
        action="append",
        required=True,
        help="a scope the account may be granted (repeat for more), e.g. users:read-contacts",
    )
    account.add_argument(
        "--rotate-secret",
        action="store_true",
        help="the account exists: give it a new secret and these scopes, enable it again and "
        "revoke every token it was issued (without this flag an existing name is an error)",
    )
    account.add_argument(
        "--secret-file",
        type=Path,
        help="give the account the secret in this file instead of generating one (a "
        "deployment's secret store made it; at least 32 characters); the secret is not "
        "printed, and an account that already has it, these scopes and is enabled is left "
        "unchanged (exit status 0), so a deployment can run this at every release",
    )
    disable = commands.add_parser(
        "disable-service-account",
        help="refuse the account new tokens and revoke the ones it holds on every service",
    )
    disable.add_argument("name")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        _run(args)
    except SigningKeyError as error:
        # A configuration problem, not a crash: say what to fix, without a traceback.
        sys.exit(f"cake-auth {args.command}: {error}")


# Written by `make up` (cake-stack) with the local stack's variables. Environment variables
# win over it, so in a container (no such file) or with CAKE_AUTH_* exported nothing changes.
LOCAL_STACK_ENV_FILE = Path(".run/dev/auth.env")


def _settings() -> AuthSettings:
    """The service's settings; from the repository root, also the local stack's env file, so
    ``uv run cake-auth create-admin …`` acts on the database ``make up`` started."""
    if LOCAL_STACK_ENV_FILE.is_file():
        return AuthSettings(_env_file=LOCAL_STACK_ENV_FILE)
    return AuthSettings()


def _run(args: argparse.Namespace) -> None:
    if args.command == "gen-keys":
        sys.exit(_generate_keys(args.dir, if_missing=args.if_missing))

    settings = _settings()
    if args.command == "serve":
        run_event_loop(serve(settings))
    elif args.command == "migrate":
        start_logging(settings)
        run_alembic_upgrade(settings.database_url, MIGRATIONS, settings.relay_role)
    elif args.command == "create-admin":
        command = CreateAdmin(
            username=args.username,
            email=args.email,
            phone=args.phone,
            password=args.password,
            fullname=args.fullname,
            birthday=args.birthday,
        )
        # Only problems are logged: the command prints what it did itself.
        configure_logging("WARNING", settings.log_json, service_name=settings.service_name)
        sys.exit(asyncio.run(run_create_admin(settings, command)))
    elif args.command == "create-service-account":
        configure_logging("WARNING", settings.log_json, service_name=settings.service_name)
        sys.exit(
            asyncio.run(
                run_create_service_account(
                    settings,
                    args.name,
                    args.scope,
                    rotate=args.rotate_secret,
                    secret_file=args.secret_file,
                )
            )
        )
    elif args.command == "disable-service-account":
        configure_logging("WARNING", settings.log_json, service_name=settings.service_name)
        sys.exit(asyncio.run(run_disable_service_account(settings, args.name)))


def _generate_keys(directory: Path, *, if_missing: bool) -> int:
    existing = directory / SIGNING_KEY_FILENAME
    if if_missing and existing.exists():
        print(f"signing key {load_signing_key(existing).kid} already in {existing}; unchanged")
        return 0
    key = generate_key_pair(directory)
    print(f"signing key {key.kid} written to {existing}")
    print(f"public key published in {directory / JWKS_FILENAME}")
    return 0


def _validate_like_registration(command: CreateAdmin) -> None:
    """The proto rules registration requests follow (the CLI bypasses the gRPC validator)."""
    request = auth_pb2.RegisterRequest(
        fullname=command.fullname if command.fullname is not None else command.username,
        email=command.email,
        username=command.username,
        phone=command.phone,
        password=command.password,
        birthday=command.birthday or "",
    )
    violations = [
        violation
        for violation in RequestValidator().violations(request)
        # An administrator's birthday is optional; when given it must be valid.
        if command.birthday is not None or violation.field != "birthday"
    ]
    if violations:
        raise InvalidArgument("Validation failed", violations)


async def run_create_admin(settings: AuthSettings, command: CreateAdmin) -> int:
    """``create-admin``: validate, create or promote, print the outcome; the exit status."""
    try:
        _validate_like_registration(command)
        async with open_accounts(settings) as accounts:
            outcome = await accounts.create_admin(command)
    except CakeError as error:
        print(f"create-admin failed: {error.message}", file=sys.stderr)
        for violation in getattr(error, "violations", ()):
            print(f"  {violation.field}: {violation.description}", file=sys.stderr)
        return 1
    user = outcome.user
    if outcome.created:
        print(f"created admin user {user.username!r} (id {user.id}, email {user.email})")
    else:
        print(
            f"promoted existing user {user.username!r} (id {user.id}) to admin; "
            "its email, phone and password were left unchanged"
        )
    return 0


async def run_create_service_account(
    settings: AuthSettings,
    name: str,
    scopes: Sequence[str],
    *,
    rotate: bool,
    secret_file: Path | None = None,
) -> int:
    """``create-service-account``: print the client id and secret (shown this once; not at
    all when it came from ``secret_file``)."""
    try:
        parsed = parse_scopes(scopes)
        given = _read_secret(secret_file) if secret_file is not None else None
        async with open_service_accounts(settings) as accounts:
            created = await accounts.create(name, parsed, rotate=rotate, secret=given)
    except ValueError as error:
        print(f"create-service-account failed: {error}", file=sys.stderr)
        return 2
    except Unavailable:
        print(
            "create-service-account failed: the old tokens cannot be revoked right now (Redis "
            "unavailable); nothing was changed, run it again",
            file=sys.stderr,
        )
        return 1
    except CakeError as error:
        print(f"create-service-account failed: {error.message}", file=sys.stderr)
        return 1
    if not created.changed:
        verb = "unchanged:"
    else:
        verb = "created" if created.created else "rotated the secret of"
    print(f"{verb} service account {created.client_id!r} (scopes: {' '.join(sorted(parsed))})")
    print(f"client_id={created.client_id}")
    if secret_file is None:
        print(f"client_secret={created.client_secret}")
        print("The secret is shown only now; store it in the client's secret store.")
    return 0


def _read_secret(path: Path) -> str:
    """The secret in ``path`` (one line; surrounding white space, a final newline, ignored)."""
    try:
        return path.read_text().strip()
    except OSError as error:
        raise ValueError(f"cannot read the secret file {path}: {error.strerror}") from error


async def run_disable_service_account(settings: AuthSettings, name: str) -> int:
    try:
        async with open_service_accounts(settings) as accounts:
            await accounts.disable(name)
    except Unavailable:
        print(
            "disable-service-account failed: its tokens cannot be revoked right now (Redis "
            "unavailable); nothing was changed, run it again",
            file=sys.stderr,
        )
        return 1
    except CakeError as error:
        print(f"disable-service-account failed: {error.message}", file=sys.stderr)
        return 1
    print(f"disabled service account {name!r}; its tokens are refused on every service")
    return 0
