"""Every overlay of k8s/ renders, is valid for Kubernetes, and follows Cake's deployment rules."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate  # type: ignore[import-untyped]  # ships no type information
import pytest
from cake_auth.settings import AuthSettings
from cake_common.settings import ServiceSettings
from cake_devtools.images import read_images
from cake_devtools.k8s_manifests import (
    Manifest,
    Pod,
    RenderedOverlay,
    connection_allowed,
    containers,
    env_of,
    labels_match,
    pod_labels,
    pod_spec,
)
from cake_devtools.stack import kafka as stack_kafka
from cake_devtools.stack import postgres as stack_postgres
from cake_devtools.stack.services import HEALTH_SERVICES, OUTBOX_SOURCES
from cake_events.settings import EventsSettings
from cake_notifications.bootstrap import CONTACTS_SCOPE
from cake_notifications.settings import NotificationsSettings
from cake_promotions.settings import PromotionsSettings
from sqlalchemy.engine import make_url

OVERLAYS = ("dev", "prod")
SERVICES = ("auth", "promotions", "events", "notifications")
STATELESS = (*SERVICES, "gateway")
SETTINGS: dict[str, type[ServiceSettings]] = {
    "auth": AuthSettings,
    "promotions": PromotionsSettings,
    "events": EventsSettings,
    "notifications": NotificationsSettings,
}
KUBERNETES_VERSION = "1.37.0"
STRIMZI_API = "kafka.strimzi.io/v1beta2"
DEV_PLACEHOLDER = "dev-only-not-a-secret"
GRPC_PORT = 50051
#: Created outside kustomize in every environment: by the Tiltfile in dev, by the operator
#: (docs/operations.md) in prod. Anything else a manifest references must be rendered.
EXTERNAL_OBJECTS = {
    ("Secret", "auth-jwt-signing-key"),
    ("ConfigMap", "jwks"),
    ("Secret", "notifications-auth-client"),
}
PROD_EXTERNAL_SECRETS = {
    "auth-secrets",
    "promotions-secrets",
    "events-secrets",
    "notifications-secrets",
}


@pytest.fixture(params=OVERLAYS)
def overlay(
    request: pytest.FixtureRequest, overlays: dict[str, RenderedOverlay]
) -> RenderedOverlay:
    return overlays[request.param]


def component(workload: Manifest) -> str:
    return str(workload["metadata"].get("labels", {}).get("app.kubernetes.io/component", ""))


def grpc_services(overlay: RenderedOverlay) -> list[Manifest]:
    return [d for d in overlay.of_kind("Deployment") if component(d) == "grpc-service"]


def hpa_for(overlay: RenderedOverlay, kind: str, name: str) -> Manifest | None:
    for hpa in overlay.of_kind("HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        if target["kind"] == kind and target["name"] == name:
            return hpa
    return None


def secret_values(secret: Manifest) -> dict[str, str]:
    values = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    values.update(secret.get("stringData", {}))
    return values


# -- schemas ----------------------------------------------------------------------------------


def strimzi_problems(manifest: Manifest, overlay: RenderedOverlay) -> list[str]:
    """Well-formedness of the Strimzi resources (their CRD schemas are not available offline)."""
    kind, name = manifest["kind"], manifest["metadata"]["name"]
    spec = manifest.get("spec", {})
    problems: list[str] = []
    kafka_names = {k["metadata"]["name"] for k in overlay.of_kind("Kafka")}
    cluster = manifest["metadata"].get("labels", {}).get("strimzi.io/cluster")
    if kind == "Kafka":
        annotations = manifest["metadata"].get("annotations", {})
        if annotations.get("strimzi.io/kraft") != "enabled":
            problems.append("Kafka without strimzi.io/kraft: enabled")
        if annotations.get("strimzi.io/node-pools") != "enabled":
            problems.append("Kafka without strimzi.io/node-pools: enabled")
        listeners = spec.get("kafka", {}).get("listeners", [])
        for listener in listeners:
            if not {"name", "port", "type", "tls"} <= listener.keys():
                problems.append(f"listener {listener} lacks name/port/type/tls")
        if not listeners:
            problems.append("Kafka without listeners")
        if "topicOperator" not in spec.get("entityOperator", {}):
            problems.append("Kafka without a topic operator (KafkaTopic would do nothing)")
        if not re.fullmatch(r"\d+\.\d+\.\d+", str(spec.get("kafka", {}).get("version", ""))):
            problems.append("Kafka version is not pinned to x.y.z")
    elif kind == "KafkaNodePool":
        if cluster not in kafka_names:
            problems.append(f"strimzi.io/cluster {cluster!r} names no Kafka")
        if not isinstance(spec.get("replicas"), int) or spec["replicas"] < 1:
            problems.append("replicas must be a positive integer")
        if not spec.get("roles") or not set(spec["roles"]) <= {"controller", "broker"}:
            problems.append(f"roles {spec.get('roles')} must be controller and/or broker")
        if spec.get("storage", {}).get("type") not in {"jbod", "persistent-claim", "ephemeral"}:
            problems.append("storage.type must be jbod, persistent-claim or ephemeral")
    elif kind == "KafkaTopic":
        if cluster not in kafka_names:
            problems.append(f"strimzi.io/cluster {cluster!r} names no Kafka")
        for field in ("partitions", "replicas"):
            if not isinstance(spec.get(field), int) or spec[field] < 1:
                problems.append(f"{field} must be a positive integer")
    else:
        problems.append(f"unexpected Strimzi kind {kind}")
    return [f"{kind}/{name}: {problem}" for problem in problems]


def test_every_object_validates_against_the_kubernetes_schemas(overlay: RenderedOverlay) -> None:
    problems: list[str] = []
    strimzi_objects = 0
    for manifest in overlay.objects:
        if manifest["apiVersion"] == STRIMZI_API:
            strimzi_objects += 1
            problems += strimzi_problems(manifest, overlay)
            continue
        try:
            kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = "/".join(str(p) for p in error.path)
            problems.append(
                f"{manifest['kind']}/{manifest['metadata']['name']} {path}: {error.message}"
            )
        except kubernetes_validate.SchemaNotFoundError as error:
            problems.append(error.message)
    assert not problems, "\n".join(problems)
    assert len(overlay.objects) > 30
    # Only prod deploys Kafka through Strimzi.
    assert (strimzi_objects > 0) == (overlay.name == "prod")


def test_a_broken_object_is_rejected_by_the_schema_check(dev: RenderedOverlay) -> None:
    """The validation above can fail: a typo in a container field is caught."""
    deployment = dev.get("Deployment", "auth")
    broken: dict[str, Any] = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_strimzi_kafka_serves_the_event_topics(prod: RenderedOverlay) -> None:
    (kafka,) = prod.of_kind("Kafka")
    pools = prod.of_kind("KafkaNodePool")
    brokers = sum(p["spec"]["replicas"] for p in pools if "broker" in p["spec"]["roles"])
    assert brokers >= 3
    topics = {t["spec"]["topicName"]: t["spec"] for t in prod.of_kind("KafkaTopic")}
    assert sorted(topics) == sorted(stack_kafka.topic_names())
    for name, spec in topics.items():
        assert spec["partitions"] == stack_kafka.PARTITIONS, name
        assert spec["replicas"] <= brokers, name
        assert int(spec["config"]["min.insync.replicas"]) < spec["replicas"], name
    plain = next(lst for lst in kafka["spec"]["kafka"]["listeners"] if not lst["tls"])
    bootstrap = prod.generated("ConfigMap", "cake-platform")["data"]["KAFKA_BOOTSTRAP_SERVERS"]
    assert bootstrap == f"{kafka['metadata']['name']}-kafka-bootstrap:{plain['port']}"


# -- pods: security, resources, probes, drain ------------------------------------------------


def test_every_pod_runs_non_root_without_privileges(overlay: RenderedOverlay) -> None:
    problems: list[str] = []
    for workload in overlay.workloads():
        where = f"{workload['kind']}/{workload['metadata']['name']}"
        spec = pod_spec(workload)
        security = spec.get("securityContext", {})
        if security.get("runAsNonRoot") is not True or not security.get("runAsUser"):
            problems.append(f"{where}: pod must set runAsNonRoot and a non-zero runAsUser")
        if security.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{where}: seccompProfile RuntimeDefault")
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{where}: automountServiceAccountToken must be false")
        for container in containers(workload):
            context = container.get("securityContext", {})
            if context.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}/{container['name']}: allowPrivilegeEscalation")
            if context.get("privileged"):
                problems.append(f"{where}/{container['name']}: privileged")
            if "ALL" not in context.get("capabilities", {}).get("drop", []):
                problems.append(f"{where}/{container['name']}: capabilities must drop ALL")
            if "readOnlyRootFilesystem" not in context:
                problems.append(f"{where}/{container['name']}: readOnlyRootFilesystem unset")
    assert not problems, "\n".join(problems)


def test_only_dev_services_have_a_writable_root_for_tilt_live_update(
    overlay: RenderedOverlay,
) -> None:
    for workload in overlay.workloads():
        live_update = overlay.name == "dev" and component(workload) == "grpc-service"
        for container in containers(workload):
            read_only = container["securityContext"]["readOnlyRootFilesystem"]
            assert read_only is not live_update, (workload["metadata"]["name"], container["name"])
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            if component(workload) in {"grpc-service", "gateway", "migration"}:
                assert "/tmp" in mounts, f"{workload['metadata']['name']}: no writable /tmp"


def test_every_container_has_cpu_and_memory_requests_and_limits(overlay: RenderedOverlay) -> None:
    for workload in overlay.workloads():
        for container in containers(workload):
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= resources.get(bound, {}).keys(), (
                    workload["metadata"]["name"],
                    container["name"],
                    bound,
                )


def test_long_running_containers_have_readiness_and_liveness_probes(
    overlay: RenderedOverlay,
) -> None:
    for workload in overlay.of_kind("Deployment", "StatefulSet"):
        for container in containers(workload):
            assert "readinessProbe" in container, workload["metadata"]["name"]
            assert "livenessProbe" in container, workload["metadata"]["name"]


def test_services_use_native_grpc_health_probes(overlay: RenderedOverlay) -> None:
    for deployment in grpc_services(overlay):
        (server,) = pod_spec(deployment)["containers"]
        ports = {p["name"]: p["containerPort"] for p in server["ports"]}
        # liveness: up until shutdown; readiness: the overall status (critical dependencies).
        for probe, health_name in (
            ("startupProbe", "liveness"),
            ("livenessProbe", "liveness"),
            ("readinessProbe", ""),
        ):
            grpc = server[probe]["grpc"]
            assert grpc["port"] == ports["grpc"] == GRPC_PORT
            assert grpc.get("service", "") == health_name, (deployment["metadata"]["name"], probe)


def test_termination_grace_outlasts_pre_stop_and_drain(overlay: RenderedOverlay) -> None:
    for deployment in overlay.of_kind("Deployment"):
        name = deployment["metadata"]["name"]
        spec = pod_spec(deployment)
        for container in spec["containers"]:
            pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {})
            drain = 0.0
            if component(deployment) == "grpc-service":
                prefix = f"CAKE_{name.upper()}_"
                drain = float(env_of(container)[f"{prefix}SHUTDOWN_GRACE_SECONDS"]["value"])
            grace = spec.get("terminationGracePeriodSeconds", 30)
            assert grace > pre_stop.get("seconds", 0) + drain, name


#: How long a caller may still use a DNS answer about the services' pods: cluster DNS caches
#: for up to 30 s (CoreDNS ttl 30 + cache 30) and the gateway re-resolves every 5 s.
DNS_STALENESS_SECONDS = 35


def test_pods_outlive_cached_dns_answers(overlay: RenderedOverlay) -> None:
    """The gRPC services are found through headless Services: a new pod must be in callers'
    answers before an old one stops (minReadySeconds), and a stopping pod must serve until no
    answer names it (preStop), or a rollout drops calls."""
    for deployment in overlay.of_kind("Deployment"):
        if component(deployment) != "grpc-service":
            continue
        name = deployment["metadata"]["name"]
        assert deployment["spec"]["minReadySeconds"] > DNS_STALENESS_SECONDS, name
        for container in pod_spec(deployment)["containers"]:
            pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
            assert pre_stop > DNS_STALENESS_SECONDS, name
        service = overlay.get("Service", name)
        assert service["spec"]["clusterIP"] == "None", f"{name}: the staleness is DNS's"


# -- scaling and disruption --------------------------------------------------------------------


def test_replicated_workloads_have_a_disruption_budget(overlay: RenderedOverlay) -> None:
    budgets = overlay.of_kind("PodDisruptionBudget")
    for workload in overlay.of_kind("Deployment", "StatefulSet"):
        name = workload["metadata"]["name"]
        hpa = hpa_for(overlay, workload["kind"], name)
        replicas = max(
            workload["spec"].get("replicas", 1), hpa["spec"]["minReplicas"] if hpa else 0
        )
        stateless = name in STATELESS
        if stateless:
            assert hpa is not None, f"{name}: stateless services scale with an HPA"
            assert "replicas" not in workload["spec"], f"{name}: the HPA owns replicas"
        if replicas > 1 or stateless:
            covering = [
                b for b in budgets if labels_match(b["spec"]["selector"], pod_labels(workload))
            ]
            assert len(covering) == 1, f"{name}: needs exactly one PodDisruptionBudget"
            assert covering[0]["spec"].get("maxUnavailable") == 1, name


def test_prod_runs_two_or_more_replicas_spread_over_nodes(prod: RenderedOverlay) -> None:
    for name in STATELESS:
        deployment = prod.get("Deployment", name)
        hpa = hpa_for(prod, "Deployment", name)
        assert hpa is not None
        assert hpa["spec"]["minReplicas"] >= 2
        terms = pod_spec(deployment)["affinity"]["podAntiAffinity"][
            "preferredDuringSchedulingIgnoredDuringExecution"
        ]
        topologies = set()
        for term in terms:
            affinity = term["podAffinityTerm"]
            assert labels_match(affinity["labelSelector"], pod_labels(deployment)), name
            topologies.add(affinity["topologyKey"])
        assert "kubernetes.io/hostname" in topologies, name


# -- secrets and references ----------------------------------------------------------------------


def test_no_secret_values_are_committed_except_dev_placeholders(overlay: RenderedOverlay) -> None:
    secrets = overlay.of_kind("Secret")
    if overlay.name == "prod":
        assert secrets == []
        return
    assert secrets, "dev has its placeholder Secrets"
    for secret in secrets:
        name = secret["metadata"]["name"]
        assert secret["metadata"]["labels"].get("cake.io/dev-placeholder") == "true", name
        for key, value in secret_values(secret).items():
            # A URL may carry no credentials (redis://redis:6379/0); anything else is one.
            secret_part = urlsplit(value).password if "://" in value else value
            assert not secret_part or DEV_PLACEHOLDER in secret_part, (name, key)


def referenced_objects(workload: Manifest) -> set[tuple[str, str, str | None]]:
    """(kind, name, key) of every Secret/ConfigMap a pod template uses."""
    found: set[tuple[str, str, str | None]] = set()
    spec = pod_spec(workload)
    for volume in spec.get("volumes", []):
        if "secret" in volume:
            found.add(("Secret", volume["secret"]["secretName"], None))
        if "configMap" in volume:
            found.add(("ConfigMap", volume["configMap"]["name"], None))
    for container in containers(workload):
        for variable in container.get("env", []):
            source = variable.get("valueFrom", {})
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                found.add(("Secret", ref["name"], ref["key"]))
            if "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                found.add(("ConfigMap", ref["name"], ref["key"]))
    return found


def test_every_reference_resolves_or_is_documented_as_external(overlay: RenderedOverlay) -> None:
    external = set(EXTERNAL_OBJECTS)
    if overlay.name == "prod":
        external |= {("Secret", name) for name in PROD_EXTERNAL_SECRETS}
    used_external: set[tuple[str, str]] = set()
    for workload in overlay.workloads():
        where = workload["metadata"]["name"]
        for kind, name, key in referenced_objects(workload):
            if (kind, name) in external:
                used_external.add((kind, name))
                continue
            target = overlay.get(kind, name)
            keys = {**target.get("data", {}), **target.get("stringData", {})}
            assert key is None or key in keys, f"{where}: {kind} {name} has no key {key}"
        account = pod_spec(workload).get("serviceAccountName")
        if account:
            overlay.get("ServiceAccount", account)
    assert used_external == external, "external objects listed but unused (or the reverse)"
    for hpa in overlay.of_kind("HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        overlay.get(target["kind"], target["name"])


def test_images_are_pinned(overlay: RenderedOverlay, repo: Path) -> None:
    """Every image has an exact tag. Dev runs only what k8s/images.yaml builds here (nothing
    can be pulled on a machine without a registry; Tilt builds the same list), with the tag
    the list gives it; prod runs the four Cake images from the release registry."""
    built = {image.name: image.tag for image in read_images(repo)}
    images = {container["image"] for w in overlay.workloads() for container in containers(w)}
    for image in images:
        if "@sha256:" in image:
            continue
        name, separator, tag = image.rpartition(":")
        assert separator and "/" not in tag and tag != "latest", f"{image}: no pinned tag"
    if overlay.name == "dev":
        assert {image.rpartition(":")[0] for image in images} == set(built), images
        for image in images:
            name, _, tag = image.rpartition(":")
            assert tag == built[name], f"{image}: k8s/images.yaml tags it {built[name]}"
    else:
        cake_images = {image for image in images if "/cake/" in image}
        names = {image.rsplit("/", 1)[-1].split(":")[0] for image in cake_images}
        assert names == {
            "cake-auth",
            "cake-promotions",
            "cake-events",
            "cake-notifications",
            "cake-gateway",
        }
        assert all(image.startswith("registry.example.com/cake/") for image in cake_images)
        assert not images - cake_images, "prod runs only Cake's images (datastores are managed)"


# -- services: configuration, ports, migrations -------------------------------------------------


def test_service_environment_names_real_settings(overlay: RenderedOverlay) -> None:
    """A misspelt variable would be silently ignored by pydantic-settings: check every name."""
    for service, settings in SETTINGS.items():
        prefix = f"CAKE_{service.upper()}_"
        required = {
            f"{prefix}{n.upper()}" for n, f in settings.model_fields.items() if f.is_required()
        }
        for workload in (
            overlay.get("Deployment", service),
            overlay.get("Job", f"{service}-migrate"),
        ):
            (container,) = pod_spec(workload)["containers"]
            env = env_of(container)
            # Variables that only feed another one through Kubernetes' $(NAME) expansion
            # (a secret inside CAKE_EVENTS_SOURCES) are no settings of their own.
            expanded = {
                name
                for variable in env.values()
                for name in re.findall(r"\$\(([A-Z0-9_]+)\)", variable.get("value", ""))
            }
            for name in env:
                if name in expanded:
                    continue
                assert name.startswith(prefix), f"{service}: {name} lacks {prefix}"
                field = name.removeprefix(prefix).lower()
                assert field in settings.model_fields, f"{service}: {name} is no setting"
            assert required <= env.keys(), f"{service}: missing {required - env.keys()}"


def secret_file(workload: Manifest, container: Manifest, path: str) -> tuple[str, str]:
    """(Secret name, key) of the file ``path`` mounted in ``container`` from a Secret."""
    mount = next(
        m for m in container.get("volumeMounts", []) if Path(path).parent == Path(m["mountPath"])
    )
    volume = next(v for v in pod_spec(workload)["volumes"] if v["name"] == mount["name"])
    assert "items" not in volume["secret"], "each key is a file of the same name"
    return volume["secret"]["secretName"], Path(path).name


def test_notifications_requests_tokens_with_the_secret_the_job_registers(
    overlay: RenderedOverlay,
) -> None:
    """Notifications proves itself to auth with a service account (client credentials), in
    dev as in prod: the auth-service-accounts Job registers the client secret of a Secret
    and notifications reads the same Secret. No long-lived token is mounted anywhere."""
    deployment = overlay.get("Deployment", "notifications")
    (server,) = pod_spec(deployment)["containers"]
    env = env_of(server)
    assert env["CAKE_NOTIFICATIONS_AUTH_CLIENT_ID"]["value"] == "notifications"
    assert not [name for name in env if "TOKEN" in name]
    notifications_secret = secret_file(
        deployment, server, env["CAKE_NOTIFICATIONS_AUTH_CLIENT_SECRET_FILE"]["value"]
    )

    job = overlay.get("Job", "auth-service-accounts")
    (register,) = pod_spec(job)["containers"]
    args = register["args"]
    assert args[:2] == ["create-service-account", "notifications"]
    assert args[args.index("--scope") + 1] == CONTACTS_SCOPE
    # Idempotent at every deploy; a new secret in the Secret re-keys the account.
    assert "--rotate-secret" in args
    job_secret = secret_file(job, register, args[args.index("--secret-file") + 1])
    assert job_secret == notifications_secret == ("notifications-auth-client", "client-secret")
    assert (
        register["image"]
        == overlay.get("Deployment", "auth")["spec"]["template"]["spec"]["containers"][0]["image"]
    )
    (auth,) = pod_spec(overlay.get("Deployment", "auth"))["containers"]
    for name in ("CAKE_AUTH_DATABASE_URL", "CAKE_AUTH_REDIS_URL"):
        assert env_of(register)[name] == env_of(auth)[name], name

    # Only auth holds the signing key: no other pod could mint a token.
    holders = {
        workload["metadata"]["name"]
        for workload in overlay.workloads()
        for volume in pod_spec(workload).get("volumes", [])
        if volume.get("secret", {}).get("secretName") == "auth-jwt-signing-key"
    }
    assert holders == {"auth"}


def test_service_ports_paths_and_targets_agree(overlay: RenderedOverlay) -> None:
    services = overlay.of_kind("Service")
    for deployment in grpc_services(overlay):
        name = deployment["metadata"]["name"]
        prefix = f"CAKE_{name.upper()}_"
        (server,) = pod_spec(deployment)["containers"]
        env = env_of(server)
        ports = {p["name"]: p["containerPort"] for p in server["ports"]}
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert env[f"{prefix}GRPC_HOST"]["value"] == "0.0.0.0"
        assert int(env[f"{prefix}GRPC_PORT"]["value"]) == ports["grpc"] == GRPC_PORT
        assert int(env[f"{prefix}METRICS_PORT"]["value"]) == ports["metrics"]
        assert int(annotations["prometheus.io/port"]) == ports["metrics"]
        mounts = [m["mountPath"] for m in server["volumeMounts"]]
        for variable in ("JWKS_FILE", "JWT_PRIVATE_KEY_FILE"):
            if f"{prefix}{variable}" in env:
                path = env[f"{prefix}{variable}"]["value"]
                assert any(path.startswith(mount + "/") for mount in mounts), (name, path)
        # A Service with a `grpc` port selects the pods (headless: clients balance per call).
        (service,) = [s for s in services if s["metadata"]["name"] == name]
        assert labels_match({"matchLabels": service["spec"]["selector"]}, pod_labels(deployment))
        assert service["spec"]["clusterIP"] == "None"
        (grpc_port,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
        assert grpc_port["port"] == GRPC_PORT
        assert grpc_port["targetPort"] == "grpc"
    for service in services:
        selected = [
            w
            for w in overlay.workloads()
            if labels_match({"matchLabels": service["spec"]["selector"]}, pod_labels(w))
        ]
        assert selected, f"Service {service['metadata']['name']} selects no pods"
    events = env_of(pod_spec(overlay.get("Deployment", "events"))["containers"][0])
    sources = json.loads(events["CAKE_EVENTS_SOURCES"]["value"])
    watched = json.loads(events["CAKE_EVENTS_HEALTH_SERVICES"]["value"])
    for source in [*sources, *watched]:
        host, port = source["grpc_target"].split(":")
        assert host == source["name"] and int(port) == GRPC_PORT
    # GET /health reports every gRPC service but events itself (it answers the report) and
    # the bank simulator (a stand-in, not part of Cake), with the local stack's criticality.
    reported = {source["name"] for source in [*sources, *watched]}
    services = {d["metadata"]["name"] for d in grpc_services(overlay)}
    assert reported == services - {"events", "payments"}
    assert {w["name"]: w["critical"] for w in watched} == dict(HEALTH_SERVICES)


def test_the_relay_reads_the_outboxes_the_local_stack_reads(overlay: RenderedOverlay) -> None:
    """CAKE_EVENTS_SOURCES: the local stack's sources with their registry topics, each
    outbox URL expanded from an earlier variable that reads the events secret."""
    names = list(pod_spec(overlay.get("Deployment", "events"))["containers"][0]["env"])
    env = {variable["name"]: variable for variable in names}
    order = [variable["name"] for variable in names]
    raw = env["CAKE_EVENTS_SOURCES"]["value"]
    sources = json.loads(raw)
    assert [(s["name"], tuple(s["topics"])) for s in sources] == list(OUTBOX_SOURCES.items())
    for source in sources:
        match = re.fullmatch(r"\$\(([A-Z0-9_]+)\)", source["outbox_url"])
        assert match, source["outbox_url"]
        reference = match.group(1)
        assert order.index(reference) < order.index("CAKE_EVENTS_SOURCES"), reference
        secret = env[reference]["valueFrom"]["secretKeyRef"]
        assert secret["name"].startswith("events-secrets")  # the dev overlay adds a hash
        assert secret["key"] == f"{source['name'].upper()}_OUTBOX_URL"
    # What the service makes of it, once Kubernetes has expanded the references.
    expanded = re.sub(r"\$\(([A-Z0-9_]+)\)", "postgresql+psycopg://r:p@h/\\1", raw)
    settings = EventsSettings(
        database_url="postgresql+psycopg://u:p@h/db", sources=json.loads(expanded)
    )
    assert [source.name for source in settings.sources] == ["auth", "promotions"]


def test_each_service_has_a_migration_job_on_its_own_image(overlay: RenderedOverlay) -> None:
    for service in SERVICES:
        deployment = overlay.get("Deployment", service)
        job = overlay.get("Job", f"{service}-migrate")
        (server,) = pod_spec(deployment)["containers"]
        (migrate,) = pod_spec(job)["containers"]
        assert migrate["image"] == server["image"]
        # Only args: under Tilt the restart wrapper replaces the entrypoint of every
        # container of the image and keeps args (serve / migrate).
        assert "command" not in migrate and "command" not in server
        assert migrate["args"] == ["migrate"]
        assert server["args"] == ["serve"]
        url = f"CAKE_{service.upper()}_DATABASE_URL"
        assert env_of(migrate)[url] == env_of(server)[url]


# -- network policies --------------------------------------------------------------------------


def test_default_deny_and_dns_cover_every_cake_pod(overlay: RenderedOverlay) -> None:
    policies = {p["metadata"]["name"]: p for p in overlay.of_kind("NetworkPolicy")}
    deny, dns = policies["default-deny"], policies["allow-dns"]
    assert sorted(deny["spec"]["policyTypes"]) == ["Egress", "Ingress"]
    assert "ingress" not in deny["spec"] and "egress" not in deny["spec"]
    for name, pod in overlay.pods().items():
        assert labels_match(deny["spec"]["podSelector"], pod.labels), name
        assert labels_match(dns["spec"]["podSelector"], pod.labels), name
    (rule,) = dns["spec"]["egress"]
    assert {(p["protocol"], p["port"]) for p in rule["ports"]} == {("UDP", 53), ("TCP", 53)}
    for service in STATELESS:
        assert service in policies, f"{service} has no NetworkPolicy of its own"


# (source, destination, port name, allowed) for pods of both overlays.
APP_CONNECTIONS = [
    ("gateway", "auth", "grpc", True),
    ("gateway", "promotions", "grpc", True),
    ("gateway", "events", "grpc", True),
    ("events", "auth", "grpc", True),
    ("events", "promotions", "grpc", True),
    ("events", "notifications", "grpc", True),
    ("promotions", "auth", "grpc", False),
    ("auth", "promotions", "grpc", False),
    ("auth", "events", "grpc", False),
    ("promotions", "events", "grpc", False),
    ("auth-migrate", "auth", "grpc", False),
    ("auth", "gateway", "http", False),
    ("gateway", "auth", "metrics", False),
    ("auth", "gateway", "ops", False),
]
# In dev the datastores are pods too: each service reaches only its own.
DEV_CONNECTIONS = [
    ("auth", "postgres", "postgres", True),
    ("auth", "redis", "redis", True),
    ("auth", "kafka", "kafka", False),
    ("promotions", "postgres", "postgres", True),
    ("promotions", "kafka", "kafka", True),
    ("promotions", "redis", "redis", True),
    ("events", "postgres", "postgres", True),
    ("events", "redis", "redis", True),
    ("events", "kafka", "kafka", True),
    ("auth-migrate", "postgres", "postgres", True),
    ("auth-migrate", "redis", "redis", False),
    # The Job registering service accounts: auth's database, and Redis (revocations) only.
    ("auth-service-accounts", "postgres", "postgres", True),
    ("auth-service-accounts", "redis", "redis", True),
    ("auth-service-accounts", "kafka", "kafka", False),
    ("kafka-topics", "kafka", "kafka", True),
    ("kafka-topics", "postgres", "postgres", False),
    ("gateway", "postgres", "postgres", False),
    ("gateway", "redis", "redis", False),
    ("gateway", "kafka", "kafka", False),
    ("postgres", "auth", "grpc", False),
    ("redis", "postgres", "postgres", False),
]


def check_connections(
    overlay: RenderedOverlay, connections: list[tuple[str, str, str, bool]]
) -> None:
    pods = overlay.pods()
    policies = overlay.of_kind("NetworkPolicy")
    wrong = []
    for source, destination, port_name, expected in connections:
        port = pods[destination].named_ports[port_name]
        if connection_allowed(policies, pods[source], pods[destination], port) is not expected:
            verdict = "allowed" if expected else "denied"
            wrong.append(f"{source} -> {destination}:{port_name} should be {verdict}")
    assert not wrong, "\n".join(wrong)


def test_only_the_gateway_and_events_reach_the_services(overlay: RenderedOverlay) -> None:
    check_connections(overlay, APP_CONNECTIONS)


def test_each_dev_service_reaches_only_its_own_datastores(dev: RenderedOverlay) -> None:
    check_connections(dev, DEV_CONNECTIONS)


def test_the_reachability_model_denies_by_default() -> None:
    """Without the allow rules, the default deny alone blocks what the tables allow."""
    deny = {
        "kind": "NetworkPolicy",
        "metadata": {"name": "default-deny"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]},
    }
    gateway = Pod({"app.kubernetes.io/name": "gateway"})
    auth = Pod({"app.kubernetes.io/name": "auth"}, {"grpc": GRPC_PORT})
    assert connection_allowed([], gateway, auth, GRPC_PORT)
    assert not connection_allowed([deny], gateway, auth, GRPC_PORT)


def test_prod_clients_reach_strimzi_and_the_managed_datastores(prod: RenderedOverlay) -> None:
    policies = {p["metadata"]["name"]: p for p in prod.of_kind("NetworkPolicy")}
    pods = prod.pods()
    # Strimzi's own pods (labelled strimzi.io/cluster) are left to the operator's policies.
    assert not labels_match(
        policies["default-deny"]["spec"]["podSelector"], {"strimzi.io/cluster": "cake"}
    )
    kafka_clients = policies["kafka-clients"]["spec"]
    postgres_clients = policies["postgres-clients"]["spec"]
    redis_clients = policies["redis-clients"]["spec"]
    for name, pod in pods.items():
        assert labels_match(kafka_clients["podSelector"], pod.labels) == (
            name in {"promotions", "events", "notifications"}
        ), name
        assert labels_match(postgres_clients["podSelector"], pod.labels) == (
            name in SERVICES or name.endswith("-migrate") or name == "auth-service-accounts"
        ), name
        assert labels_match(redis_clients["podSelector"], pod.labels) == (
            name in {"auth", "auth-service-accounts", "promotions", "events", "notifications"}
        ), name
    (kafka,) = prod.of_kind("Kafka")
    peers = kafka["spec"]["kafka"]["listeners"][0]["networkPolicyPeers"]
    admitted = {
        name
        for name, pod in pods.items()
        if any(labels_match(p["podSelector"], pod.labels) for p in peers)
    }
    assert admitted == {"promotions", "events", "notifications"}


# -- dev datastores agree with the local stack -------------------------------------------------


def test_dev_postgres_provisions_what_the_local_stack_does(dev: RenderedOverlay) -> None:
    script = dev.generated("ConfigMap", "postgres-init")["data"]["init-cake-databases.sh"]
    for role in stack_postgres.ROLES:
        assert f"CREATE ROLE {role} LOGIN" in script
    for database in stack_postgres.DATABASES:
        assert f"CREATE DATABASE {database.name} OWNER {database.owner}" in script
        for role in database.connect_roles:
            assert f"GRANT CONNECT ON DATABASE {database.name} TO {role};" in script
    passwords = secret_values(dev.generated("Secret", "postgres-credentials"))
    postgres = dev.get("Service", "postgres")
    postgres_port = postgres["spec"]["ports"][0]["port"]

    def check(url: str, role: str, database: str) -> None:
        parsed = make_url(url)
        assert parsed.drivername == "postgresql+psycopg"
        assert (parsed.host, parsed.port) == ("postgres", postgres_port)
        assert (parsed.username, parsed.database) == (role, database)
        assert parsed.password == passwords[f"{role.upper()}_PASSWORD"]

    for service in SERVICES:
        values = secret_values(dev.generated("Secret", f"{service}-secrets"))
        check(values["DATABASE_URL"], f"cake_{service}", f"cake_{service}")
    events = secret_values(dev.generated("Secret", "events-secrets"))
    for source in stack_postgres.DATABASES:
        if stack_postgres.RELAY_ROLE in source.connect_roles:
            key = f"{source.name.removeprefix('cake_').upper()}_OUTBOX_URL"
            check(events[key], stack_postgres.RELAY_ROLE, source.name)


def test_dev_kafka_has_the_local_stack_topics(dev: RenderedOverlay) -> None:
    (job,) = [j for j in dev.of_kind("Job") if j["metadata"]["name"] == "kafka-topics"]
    env = env_of(pod_spec(job)["containers"][0])
    assert env["CAKE_TOPICS"]["value"].split() == stack_kafka.topic_names()
    assert int(env["CAKE_TOPIC_PARTITIONS"]["value"]) == stack_kafka.PARTITIONS
    bootstrap = dev.generated("ConfigMap", "cake-platform")["data"]["KAFKA_BOOTSTRAP_SERVERS"]
    assert bootstrap == env["KAFKA_BOOTSTRAP"]["value"]
    host, port = bootstrap.split(":")
    kafka = dev.get("Service", host)
    assert int(port) in {p["port"] for p in kafka["spec"]["ports"]}


def test_prod_serves_no_grpc_reflection(prod: RenderedOverlay) -> None:
    for name in ("auth", "promotions", "events"):
        (server,) = pod_spec(prod.get("Deployment", name))["containers"]
        assert env_of(server)[f"CAKE_{name.upper()}_GRPC_REFLECTION"]["value"] == "false", name
