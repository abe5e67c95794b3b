"""Drills on the real cluster, through the in-cluster gateway.

1. An auth pod and a promotions pod are deleted during a first-login burst: no event is lost,
   no voucher doubled, every user gets one (logins that fail while a pod goes are retried by
   the client, as a mobile app would; how many had to be is reported).
2. auth rolls to a new image tag under steady logins: not one request fails (readiness, the
   preStop pause, Envoy's retries and the gRPC drain have to work together for that).

The gateway's per-address rate limits would throttle this traffic, which all comes from one
port-forward: each gateway pod's limits are switched to "not enforced" through Envoy's runtime
(the admin port, reached by port-forward) for the drills and back afterwards.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from cake_devtools.cluster_client import (
    Account,
    CakeClient,
    LoadResult,
    register_many,
    steady_logins,
    timed_login,
    until_ok,
)
from cake_devtools.k8s_deploy import Kubectl, deploy, port_forward, render
from cake_devtools.k8s_gateway import ADMIN_PORT, repository_root
from cake_devtools.k8s_test import load_references, retag, save_references

BURST_USERS = 60
ROLLOUT_LOGINS_PER_SECOND = 4.0
ENFORCED_KEY = "cake.gateway.rate_limit_enforced"


def pods(kubectl: Kubectl, app: str) -> list[str]:
    listed = kubectl.get_json("pods", "-l", f"app.kubernetes.io/name={app}")
    return [
        pod["metadata"]["name"]
        for pod in listed["items"]
        if pod["status"].get("phase") == "Running" and not pod["metadata"].get("deletionTimestamp")
    ]


def set_runtime(kubectl: Kubectl, pod: str, key: str, value: str) -> None:
    with port_forward(kubectl, f"pod/{pod}", ADMIN_PORT) as port:
        response = httpx.post(f"http://127.0.0.1:{port}/runtime_modify?{key}={value}", timeout=10)
        assert response.status_code == 200, response.text


@pytest.fixture(scope="module")
def limits_lifted(kubectl: Kubectl) -> Iterator[None]:
    gateways = pods(kubectl, "gateway")
    assert gateways, "no running gateway pod"
    for pod in gateways:
        set_runtime(kubectl, pod, ENFORCED_KEY, "0")
    yield
    for pod in pods(kubectl, "gateway"):
        set_runtime(kubectl, pod, ENFORCED_KEY, "100")


def wait_rolled_out(kubectl: Kubectl, deployment: str, timeout: float = 300) -> None:
    kubectl.run(
        "rollout",
        "status",
        f"deployment/{deployment}",
        f"--timeout={int(timeout)}s",
        timeout=timeout + 30,
    )


def voucher_counts(sql: Any, campaign: int) -> tuple[int, int]:
    ((issued, holders),) = sql(
        "cake_promotions",
        "SELECT count(v.id), count(DISTINCT v.user_id) FROM vouchers v"
        " JOIN user_promotions up ON up.id = v.user_promotion_id"
        f" WHERE up.campaign_id = {int(campaign)}",
    )
    return int(issued), int(holders)


def first_login_events(sql: Any, users: list[Account]) -> list[str]:
    ids = ",".join(f"'{int(user.user_id)}'" for user in users)
    rows = sql(
        "cake_auth",
        "SELECT event_id::text FROM outbox"
        f" WHERE event_type = 'USER_FIRST_LOGIN' AND aggregate_id IN ({ids})",
    )
    return [row[0] for row in rows]


def consumed(sql: Any, event_ids: list[str]) -> int:
    if not event_ids:
        return 0
    ids = ",".join(f"'{event_id}'" for event_id in event_ids)
    ((count,),) = sql(
        "cake_promotions",
        f"SELECT count(DISTINCT event_id) FROM inbox WHERE event_id::text IN ({ids})",
    )
    return int(count)


@pytest.mark.usefixtures("limits_lifted")
def test_pods_deleted_during_a_first_login_burst_lose_nothing(
    client: CakeClient, admin: Account, kubectl: Kubectl, sql: Any, record: Any
) -> None:
    campaign = client.create_campaign(admin, 1000, f"k8s burst {uuid.uuid4().hex[:6]}")
    try:
        users = register_many(client, BURST_USERS, "k8s_burst")
        result = LoadResult()
        deadline = time.monotonic() + 180
        victims = [pods(kubectl, "auth")[0], pods(kubectl, "promotions")[0]]
        with ThreadPoolExecutor(8) as pool:
            retries = [
                pool.submit(until_ok, lambda u=user: timed_login(client, u, result), deadline)
                for user in users
            ]
            while result.ok < BURST_USERS // 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            started = time.monotonic()
            kubectl.run("delete", "pod", *victims, "--wait=false")
            failed_attempts = sum(future.result() for future in retries)
        for deployment in ("auth", "promotions"):
            wait_rolled_out(kubectl, deployment)
        replaced_after = time.monotonic() - started

        settle_deadline = time.monotonic() + 120
        issued, holders = voucher_counts(sql, campaign)
        while holders < BURST_USERS and time.monotonic() < settle_deadline:
            time.sleep(0.5)
            issued, holders = voucher_counts(sql, campaign)
        all_vouchers_after = time.monotonic() - started
        time.sleep(3)  # a late duplicate would show up now
        issued, holders = voucher_counts(sql, campaign)
        events = first_login_events(sql, users)
        applied = consumed(sql, events)
    finally:
        client.end_campaign(admin, campaign)
    figures = {
        "users": BURST_USERS,
        "pods_deleted": " ".join(victims),
        "login_attempts_retried": failed_attempts,
        "first_login_events": len(set(events)),
        "events_consumed": applied,
        "events_lost": len(set(events)) - applied,
        "vouchers_issued": issued,
        "vouchers_doubled": issued - holders,
        "users_without_voucher": BURST_USERS - holders,
        "pods_replaced_after_s": round(replaced_after, 1),
        "all_vouchers_after_s": round(all_vouchers_after, 1),
    }
    record("drill_pod_deletion", figures)
    assert len(set(events)) == BURST_USERS, figures
    assert figures["events_lost"] == 0, figures
    assert figures["vouchers_doubled"] == 0, figures
    assert figures["users_without_voucher"] == 0, figures


@pytest.mark.usefixtures("limits_lifted")
def test_auth_rolls_to_a_new_image_under_steady_logins_without_a_failed_request(
    client: CakeClient, kubectl: Kubectl, state_dir: Path, record: Any
) -> None:
    users = register_many(client, 30, "k8s_roll")
    references = load_references(state_dir)
    new = retag(references, ["cake-auth"], f"-roll{int(time.time())}")
    assert new["cake-auth"] != references["cake-auth"]
    references.update(new)
    before = set(pods(kubectl, "auth"))

    result = LoadResult()
    stop = threading.Event()
    load = threading.Thread(
        target=steady_logins, args=(client, users, ROLLOUT_LOGINS_PER_SECOND, stop, result)
    )
    load.start()
    try:
        time.sleep(5)
        started = time.monotonic()
        deploy(kubectl, render(repository_root(), references), print)
        save_references(state_dir, references)
        rolled_in = time.monotonic() - started
        time.sleep(10)  # the old pods' drain and a few seconds of the new ones
    finally:
        stop.set()
        load.join()
    after = pods(kubectl, "auth")
    # Old pods still in their preStop pause are on their way out: only the others count.
    images = {
        pod["spec"]["containers"][0]["image"]
        for pod in kubectl.get_json("pods", "-l", "app.kubernetes.io/name=auth")["items"]
        if not pod["metadata"].get("deletionTimestamp")
    }
    figures = {**result.figures(), "rollout_s": round(rolled_in, 1), "new_image": new["cake-auth"]}
    record("drill_rolling_update", figures)
    assert not before & set(after), f"old auth pods still running: {before & set(after)}"
    assert images == {new["cake-auth"]}, images
    assert result.ok > 0, figures
    assert figures["failed"] == 0, figures
