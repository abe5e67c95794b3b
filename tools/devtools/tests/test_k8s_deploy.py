"""The pure parts of cake_devtools.k8s_deploy: what `make k8s-test` applies, and in what order,
compared with what the Tiltfile asks Tilt to do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cake_devtools.k8s_deploy import (
    STAGES,
    image_repository,
    inject_images,
    is_immutable_error,
    key_objects,
    stage_of,
    stages,
    unbuilt_images,
)
from cake_devtools.k8s_gateway import repository_root
from cake_devtools.k8s_manifests import WORKLOAD_KINDS, ManifestError, RenderedOverlay
from cake_devtools.stack.service_tokens import ensure_client_secret


def workload(kind: str, name: str, *images: str) -> dict[str, Any]:
    containers = [{"name": f"c{i}", "image": image} for i, image in enumerate(images)]
    return {
        "kind": kind,
        "metadata": {"name": name},
        "spec": {"template": {"spec": {"containers": containers}}},
    }


@pytest.mark.parametrize(
    ("reference", "repository"),
    [
        ("cake-auth", "cake-auth"),
        ("cake-auth:dev", "cake-auth"),
        ("cake-auth@sha256:abc", "cake-auth"),
        ("registry.local:5000/cake/cake-auth:1.0", "registry.local:5000/cake/cake-auth"),
        ("registry.local:5000/cake-auth", "registry.local:5000/cake-auth"),
    ],
)
def test_image_repository_drops_tag_and_digest(reference: str, repository: str) -> None:
    assert image_repository(reference) == repository


def test_built_images_replace_the_references_and_are_never_pulled() -> None:
    objects = [workload("Deployment", "auth", "cake-auth:dev"), {"kind": "Service"}]
    injected = inject_images(objects, {"cake-auth": "cake-auth:k8s-0123456789ab"})
    container = injected[0]["spec"]["template"]["spec"]["containers"][0]
    assert container == {
        "name": "c0",
        "image": "cake-auth:k8s-0123456789ab",
        "imagePullPolicy": "IfNotPresent",
    }
    # The input is left as it was.
    assert objects[0]["spec"]["template"]["spec"]["containers"][0]["image"] == "cake-auth:dev"


def test_images_that_were_not_built_are_reported() -> None:
    objects = [workload("Job", "x", "cake-auth:k8s-1", "busybox:latest")]
    assert unbuilt_images(objects, {"cake-auth": "cake-auth:k8s-1"}) == ["busybox:latest"]


def test_key_objects_are_the_tiltfile_ones() -> None:
    secret, config_map, client = key_objects("cake-dev", "PEM", '{"keys": []}', "S3CRET")
    assert secret["metadata"] == {"name": "auth-jwt-signing-key", "namespace": "cake-dev"}
    assert secret["stringData"] == {"jwt-signing-key.pem": "PEM"}
    assert config_map["metadata"] == {"name": "jwks", "namespace": "cake-dev"}
    assert config_map["data"] == {"jwks.json": '{"keys": []}'}
    assert client["metadata"] == {"name": "notifications-auth-client", "namespace": "cake-dev"}
    assert client["stringData"] == {"client-secret": "S3CRET"}


def test_the_client_secret_is_made_once_private_and_strong(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "notifications-client-secret"
    secret = ensure_client_secret(path)
    assert len(secret) >= 43 and secret.isascii() and " " not in secret
    assert path.stat().st_mode & 0o777 == 0o600
    assert ensure_client_secret(path) == secret  # kept: the account already has it
    assert ensure_client_secret(tmp_path / "other") != secret


def test_stages_follow_resource_deps_order() -> None:
    objects = [
        workload("Deployment", "gateway"),
        workload("Deployment", "auth"),
        workload("Job", "auth-migrate"),
        {"kind": "ConfigMap", "metadata": {"name": "c"}},
        workload("StatefulSet", "postgres"),
    ]
    order = [
        (stage, [o["metadata"]["name"] for o in members]) for stage, members in stages(objects)
    ]
    assert order == [
        ("configuration", ["c"]),
        ("datastores", ["postgres"]),
        ("topics and migrations", ["auth-migrate"]),
        ("services", ["auth"]),
        ("gateway", ["gateway"]),
    ]


def test_a_workload_outside_every_stage_is_an_error() -> None:
    with pytest.raises(ManifestError, match="no deployment stage"):
        stage_of(workload("Deployment", "a-service-nobody-staged"))


def test_every_workload_of_the_dev_overlay_has_a_stage() -> None:
    overlay = RenderedOverlay.build(repository_root() / "k8s" / "overlays" / "dev")
    names = {o["metadata"]["name"] for o in overlay.of_kind(*WORKLOAD_KINDS)}
    assert names == set().union(*(members for _, members in STAGES))


def test_immutable_errors_are_recognised() -> None:
    assert is_immutable_error(
        'The Job "auth-migrate" is invalid: spec.template: field is immutable'
    )
    assert not is_immutable_error("error: unable to recognize: no matches for kind")
