"""Rendered kustomize overlays of ``k8s/``, and questions one asks of them offline.

Used by ``tests/k8s`` (and handy at a REPL): render an overlay with ``kubectl kustomize``,
find objects, walk pod templates, match label selectors, and evaluate the NetworkPolicies
for a pod-to-pod connection inside the namespace, all without a cluster.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

Manifest = dict[str, Any]

#: Kinds whose pod template runs containers.
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job")


class ManifestError(RuntimeError):
    """An overlay does not render, or an object asked for is not in it."""


def venv_tool(name: str) -> str:
    """A binary of this virtualenv (the version uv.lock pins) before anything on PATH."""
    beside_python = Path(sys.executable).parent / name
    if beside_python.is_file():
        return str(beside_python)
    found = shutil.which(name)
    if found is None:
        raise ManifestError(f"{name} not found: it is a dev dependency, run `uv sync`")
    return found


def kustomize_build(directory: Path) -> str:
    """``kubectl kustomize DIRECTORY`` (kustomize v5 inside kubectl)."""
    result = subprocess.run(
        [venv_tool("kubectl"), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if result.returncode != 0:
        raise ManifestError(f"kubectl kustomize {directory} failed:\n{result.stderr}")
    return result.stdout


@dataclass(frozen=True)
class RenderedOverlay:
    """The objects one overlay renders to."""

    name: str
    objects: tuple[Manifest, ...]

    @classmethod
    def build(cls, directory: Path) -> RenderedOverlay:
        documents = yaml.safe_load_all(kustomize_build(directory))
        return cls(directory.name, tuple(doc for doc in documents if doc))

    def of_kind(self, *kinds: str) -> list[Manifest]:
        return [o for o in self.objects if o["kind"] in kinds]

    def get(self, kind: str, name: str) -> Manifest:
        for manifest in self.of_kind(kind):
            if manifest["metadata"]["name"] == name:
                return manifest
        raise ManifestError(f"{self.name}: no {kind} {name}")

    def generated(self, kind: str, name: str) -> Manifest:
        """A generated ConfigMap/Secret by its generator name (without the content hash)."""
        for manifest in self.of_kind(kind):
            if generator_name(manifest) == name:
                return manifest
        raise ManifestError(f"{self.name}: no generated {kind} {name}")

    @property
    def namespace(self) -> str:
        namespaces = self.of_kind("Namespace")
        if len(namespaces) != 1:
            raise ManifestError(f"{self.name}: expected one Namespace, found {len(namespaces)}")
        return str(namespaces[0]["metadata"]["name"])

    def workloads(self) -> list[Manifest]:
        return self.of_kind(*WORKLOAD_KINDS)

    def pods(self) -> dict[str, Pod]:
        """One pod per workload, by workload name."""
        return {w["metadata"]["name"]: Pod.of(w) for w in self.workloads()}


#: kustomize's generator suffix: 10 characters of a hash in its own alphabet (hex digits with
#: 0, 1, 3, a and e replaced by g, h, k, m and t, so the suffix never reads as a word).
_NAME_HASH = re.compile(r"-[2456789bcdfghkmt]{10}")


def generator_name(manifest: Manifest) -> str:
    """The name without kustomize's content-hash suffix, if it has one."""
    name = str(manifest["metadata"]["name"])
    match = _NAME_HASH.search(name)
    return name[: match.start()] if match and match.end() == len(name) else name


def pod_spec(workload: Manifest) -> Manifest:
    return dict(workload["spec"]["template"]["spec"])


def pod_labels(workload: Manifest) -> dict[str, str]:
    return dict(workload["spec"]["template"]["metadata"].get("labels", {}))


def containers(workload: Manifest) -> list[Manifest]:
    """Init containers and containers of the workload's pod template."""
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def env_of(container: Manifest) -> dict[str, Manifest]:
    return {variable["name"]: variable for variable in container.get("env", [])}


def labels_match(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A LabelSelector (``matchLabels`` and ``matchExpressions``) against a label set."""
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values", [])
        if operator == "In":
            matched = labels.get(key) in values
        elif operator == "NotIn":
            matched = labels.get(key) not in values
        elif operator == "Exists":
            matched = key in labels
        elif operator == "DoesNotExist":
            matched = key not in labels
        else:
            raise ManifestError(f"unknown selector operator {operator}")
        if not matched:
            return False
    return True


# -- NetworkPolicy evaluation ----------------------------------------------------------------


@dataclass(frozen=True)
class Pod:
    """What NetworkPolicies look at: a pod's labels and its named container ports."""

    labels: Mapping[str, str]
    named_ports: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, workload: Manifest) -> Pod:
        ports = {
            port["name"]: int(port["containerPort"])
            for container in containers(workload)
            for port in container.get("ports", [])
            if "name" in port
        }
        return cls(pod_labels(workload), ports)


def _policy_types(policy: Manifest) -> list[str]:
    spec = policy["spec"]
    if "policyTypes" in spec:
        return list(spec["policyTypes"])
    return ["Ingress", "Egress"] if "egress" in spec else ["Ingress"]


def _selecting(policies: Iterable[Manifest], pod: Pod, policy_type: str) -> list[Manifest]:
    return [
        policy
        for policy in policies
        if policy_type in _policy_types(policy)
        and labels_match(policy["spec"]["podSelector"], pod.labels)
    ]


def _peer_matches(peer: Manifest, pod: Pod) -> bool:
    # Only same-namespace pod selectors can match a pod of the overlay: a namespaceSelector
    # names another namespace here (Prometheus, kube-dns), and an ipBlock addresses
    # something outside the cluster (managed datastores), never one of these pods.
    if "namespaceSelector" in peer or "ipBlock" in peer:
        return False
    return labels_match(peer["podSelector"], pod.labels)


def _port_matches(rule: Manifest, destination: Pod, port: int) -> bool:
    specs = rule.get("ports")
    if not specs:
        return True
    for spec in specs:
        if spec.get("protocol", "TCP") != "TCP":
            continue
        wanted = spec.get("port")
        if wanted is None:
            return True
        if isinstance(wanted, int) and wanted == port:
            return True
        if isinstance(wanted, str) and destination.named_ports.get(wanted) == port:
            return True
    return False


def _rules_allow(rules: Iterable[Manifest], peers_key: str, peer: Pod, dst: Pod, port: int) -> bool:
    for rule in rules:
        peers = rule.get(peers_key)
        peer_ok = not peers or any(_peer_matches(p, peer) for p in peers)
        if peer_ok and _port_matches(rule, dst, port):
            return True
    return False


def connection_allowed(
    policies: Iterable[Manifest], source: Pod, destination: Pod, port: int
) -> bool:
    """Whether a TCP connection from ``source`` to ``destination:port`` (same namespace)
    passes both the source's egress and the destination's ingress policies."""
    policies = list(policies)
    egress = _selecting(policies, source, "Egress")
    if egress and not any(
        _rules_allow(p["spec"].get("egress", []), "to", destination, destination, port)
        for p in egress
    ):
        return False
    ingress = _selecting(policies, destination, "Ingress")
    return not ingress or any(
        _rules_allow(p["spec"].get("ingress", []), "from", source, destination, port)
        for p in ingress
    )


#: Names of Cake's own metrics and of the gRPC server ones (their conventional names).
METRIC_NAME = r"\b(?:cake|grpc_server)_\w+"
_METRIC_DEFINITION = re.compile(
    r"\b(Counter|Gauge|Histogram|Summary)\(\s*\"((?:cake|grpc_server)_\w+)\"", re.S
)


#: Collectors named per service (``f"{prefix}_..."``, ``prefix = f"cake_{service}"``), as the
#: shared Kafka consumer's ``ConsumerMetrics`` defines them.
_PREFIXED_METRIC_DEFINITION = re.compile(
    r"\b(Counter|Gauge|Histogram|Summary)\(\s*f\"\{prefix\}(_\w+)\"", re.S
)
_CONSUMER_METRICS_OF = re.compile(r"\bConsumerMetrics\(\s*\"(\w+)\"")


def exposed_metric_series(repo: Path) -> set[str]:
    """Series names the prometheus_client collectors defined in the Python sources expose
    (what dashboards and alert rules may name)."""
    definitions: list[tuple[str, str]] = []
    sources = [*repo.glob("services/*/src/**/*.py"), *repo.glob("libs/common/src/**/*.py")]
    texts = [source.read_text() for source in sources]
    for text in texts:
        definitions += _METRIC_DEFINITION.findall(text)
    consumer = (repo / "libs/common/src/cake_common/consumer.py").read_text()
    for service in {name for text in texts for name in _CONSUMER_METRICS_OF.findall(text)}:
        definitions += [
            (kind, f"cake_{service}{suffix}")
            for kind, suffix in _PREFIXED_METRIC_DEFINITION.findall(consumer)
        ]
    series: set[str] = set()
    for kind, name in definitions:
        if kind == "Counter":
            series.add(name.removesuffix("_total") + "_total")
        elif kind in {"Histogram", "Summary"}:
            series |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            series.add(name)
    return series
