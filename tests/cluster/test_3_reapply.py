"""Re-applying the dev overlay, as ``tilt up`` does on every start and after every rebuild.

Unchanged objects stay as they are (no rollout, no Job re-run); new images for the three
services re-create their migration Jobs, whose migrations run again on the migrated databases
(they must be idempotent) and complete, and the services roll; auth's re-creates the Job
that registers notifications' service account, which leaves the account unchanged; nothing
needs deleting by hand.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
from cake_devtools.k8s_deploy import Kubectl, deploy, render
from cake_devtools.k8s_gateway import repository_root
from cake_devtools.k8s_test import load_references, retag, save_references

SERVICES = ("auth", "promotions", "events")


def generations(kubectl: Kubectl) -> dict[str, Any]:
    deployments = kubectl.get_json("deployments")["items"]
    jobs = kubectl.get_json("jobs")["items"]
    return {
        **{f"deployment/{d['metadata']['name']}": d["metadata"]["generation"] for d in deployments},
        **{f"job/{j['metadata']['name']}": j["metadata"]["uid"] for j in jobs},
    }


def test_reapplying_the_same_overlay_changes_nothing(kubectl: Kubectl, state_dir: Path) -> None:
    before = generations(kubectl)
    deploy(kubectl, render(repository_root(), load_references(state_dir)), print)
    assert generations(kubectl) == before


def test_new_service_images_rerun_the_migrations_and_roll(
    kubectl: Kubectl, state_dir: Path, http: httpx.Client, record: Any, sql: Any
) -> None:
    account = "SELECT generation FROM service_accounts WHERE client_id = 'notifications'"
    generation = sql("cake_auth", account)
    assert len(generation) == 1, generation
    references = load_references(state_dir)
    new = retag(references, [f"cake-{s}" for s in SERVICES], f"-again{int(time.time())}")
    references.update(new)
    before = generations(kubectl)
    started = time.monotonic()
    deploy(kubectl, render(repository_root(), references), print)
    save_references(state_dir, references)
    after = generations(kubectl)
    for service in SERVICES:
        assert after[f"job/{service}-migrate"] != before[f"job/{service}-migrate"], service
        assert after[f"deployment/{service}"] > before[f"deployment/{service}"], service
        job = kubectl.get_json(f"job/{service}-migrate")
        assert job["status"].get("succeeded") == 1, job["status"]
    assert after["deployment/gateway"] == before["deployment/gateway"]
    # auth's new image re-creates the Job that registers the service accounts too: it runs
    # again and, the Secret's client secret being the same, leaves notifications' account as
    # it was (same generation: the tokens it holds were not revoked).
    assert after["job/auth-service-accounts"] != before["job/auth-service-accounts"]
    job = kubectl.get_json("job/auth-service-accounts")
    assert job["status"].get("succeeded") == 1, job["status"]
    log = kubectl.run("logs", "job/auth-service-accounts").stdout
    assert "unchanged: service account 'notifications'" in log, log
    assert sql("cake_auth", account) == generation
    # The health report's own channels to the new pods may take a moment to connect.
    deadline = time.monotonic() + 30
    health = http.get("/health")
    while health.status_code != 200 and time.monotonic() < deadline:
        time.sleep(1)
        health = http.get("/health")
    assert health.status_code == 200, health.text
    record("reapply", {"services_rolled_and_migrated_in_s": round(time.monotonic() - started, 1)})
