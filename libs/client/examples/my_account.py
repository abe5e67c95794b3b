"""Log in as a user and print the profile and vouchers, through cake-client.

    python libs/client/examples/my_account.py 127.0.0.1:17051,127.0.0.1:17052 alice 'secret'

The first target serves AuthService, the second PromotionsService (give one when both are
behind the same gateway or address). The session renews itself while the program runs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import grpc
from cake.auth.v1 import auth_pb2
from cake.promotions.v1 import promotions_pb2
from cake_client import PasswordSession, connect


async def main(auth_target: str, promotions_target: str, account: str, password: str) -> int:
    session = PasswordSession(account, password)
    async with (
        connect(auth_target, tokens=session) as auth,
        connect(promotions_target, tokens=session) as promotions,
    ):
        try:
            profile = await auth.auth.GetProfile(auth_pb2.GetProfileRequest())
            vouchers = await promotions.promotions.ListMyVouchers(
                promotions_pb2.ListMyVouchersRequest()
            )
        except grpc.aio.AioRpcError as error:
            print(f"{error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    print(f"user {profile.user.id} {profile.user.username} <{profile.user.email}>")
    print(f"vouchers: {len(vouchers.vouchers)}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", help="host:port, or auth_host:port,promotions_host:port")
    parser.add_argument("account", help="username, e-mail or phone")
    parser.add_argument("password")
    args = parser.parse_args()
    auth_target, _, promotions_target = args.targets.partition(",")
    raise SystemExit(
        asyncio.run(
            main(auth_target, promotions_target or auth_target, args.account, args.password)
        )
    )
