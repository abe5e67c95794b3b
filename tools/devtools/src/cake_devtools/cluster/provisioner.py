"""A hostPath volume provisioner for the single node (runs as a host process).

There is no dynamic provisioner in a bare cluster, and the dev overlay's StatefulSets claim
volumes without naming a class. The default StorageClass (``cake-hostpath``, binding mode
WaitForFirstConsumer) names this provisioner; every few seconds it

- creates a PersistentVolume, pre-bound to the claim, for each pending claim of its class
  that the scheduler has placed on the node: a directory under the volumes root, mode 0777
  so that pods running as any user can write to it (hostPath volumes get no fsGroup);
- deletes the directory and the volume of each Released volume it provisioned whose policy
  is Delete (``Retain`` volumes stay, as for any provisioner).

It talks to the API server with a client certificate (the user is bound to the
``system:persistent-volume-provisioner`` role) and keeps no state of its own.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import ssl
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml

from cake_devtools.cluster.config import PROVISIONER

SELECTED_NODE = "volume.kubernetes.io/selected-node"
PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"

Object = dict[str, Any]


def our_classes(classes: list[Object], provisioner: str = PROVISIONER) -> dict[str, Object]:
    return {c["metadata"]["name"]: c for c in classes if c.get("provisioner") == provisioner}


def claims_to_provision(
    claims: list[Object], classes: dict[str, Object], volumes: list[Object], node: str
) -> list[Object]:
    """Pending claims of our classes, placed on our node (or of an Immediate class), that no
    volume is bound or pre-bound to yet."""
    claimed = {pv["spec"]["claimRef"].get("uid") for pv in volumes if pv["spec"].get("claimRef")}
    wanted = []
    for claim in claims:
        spec, meta = claim["spec"], claim["metadata"]
        cls = classes.get(spec.get("storageClassName") or "")
        if cls is None or claim.get("status", {}).get("phase") != "Pending":
            continue
        if spec.get("volumeName") or meta["uid"] in claimed or meta.get("deletionTimestamp"):
            continue
        if spec.get("volumeMode", "Filesystem") != "Filesystem":
            continue
        immediate = cls.get("volumeBindingMode", "Immediate") == "Immediate"
        selected = (meta.get("annotations") or {}).get(SELECTED_NODE)
        if selected == node or (immediate and selected is None):
            wanted.append(claim)
    return wanted


def volume_dir(root: Path, claim: Object) -> Path:
    meta = claim["metadata"]
    return root / f"{meta['namespace']}-{meta['name']}-{meta['uid'][:8]}"


def volume_for_claim(claim: Object, cls: Object, *, root: Path, node: str) -> Object:
    """The PersistentVolume that satisfies ``claim``, pre-bound to it (``claimRef`` by uid)."""
    meta, spec = claim["metadata"], claim["spec"]
    size = spec.get("resources", {}).get("requests", {}).get("storage", "1Gi")
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {
            "name": f"pvc-{meta['uid']}",
            "annotations": {PROVISIONED_BY: PROVISIONER},
        },
        "spec": {
            "capacity": {"storage": size},
            "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": cls.get("reclaimPolicy", "Delete"),
            "storageClassName": cls["metadata"]["name"],
            "volumeMode": "Filesystem",
            "claimRef": {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "namespace": meta["namespace"],
                "name": meta["name"],
                "uid": meta["uid"],
            },
            "hostPath": {"path": str(volume_dir(root, claim)), "type": "Directory"},
            "nodeAffinity": {
                "required": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {
                                    "key": "kubernetes.io/hostname",
                                    "operator": "In",
                                    "values": [node],
                                }
                            ]
                        }
                    ]
                }
            },
        },
    }


def volumes_to_delete(volumes: list[Object], root: Path) -> list[Object]:
    """Released volumes we provisioned under ``root`` whose reclaim policy is Delete."""
    return [
        pv
        for pv in volumes
        if (pv["metadata"].get("annotations") or {}).get(PROVISIONED_BY) == PROVISIONER
        and pv.get("status", {}).get("phase") == "Released"
        and pv["spec"].get("persistentVolumeReclaimPolicy") == "Delete"
        and _under(Path(pv["spec"].get("hostPath", {}).get("path", "/")), root)
    ]


def _under(path: Path, root: Path) -> bool:
    return path != root and path.resolve().is_relative_to(root.resolve())


class Api:
    """Just enough of a Kubernetes client: the kubeconfig's first cluster and user."""

    def __init__(self, kubeconfig: Path) -> None:
        config = yaml.safe_load(kubeconfig.read_text())
        cluster = config["clusters"][0]["cluster"]
        user = config["users"][0]["user"]
        context = ssl.create_default_context(
            cadata=base64.b64decode(cluster["certificate-authority-data"]).decode()
        )
        with tempfile.TemporaryDirectory() as tmp:
            cert, key = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
            cert.write_bytes(base64.b64decode(user["client-certificate-data"]))
            key.touch(mode=0o600)
            key.write_bytes(base64.b64decode(user["client-key-data"]))
            context.load_cert_chain(cert, key)
        self.client = httpx.Client(base_url=cluster["server"], verify=context, timeout=10)

    def items(self, path: str) -> list[Object]:
        response = self.client.get(path)
        response.raise_for_status()
        items: list[Object] = response.json()["items"]
        return items

    def create(self, path: str, body: Object) -> None:
        response = self.client.post(path, json=body)
        if response.status_code != 409:  # already exists: an earlier round made it
            response.raise_for_status()

    def delete(self, path: str) -> None:
        response = self.client.delete(path)
        if response.status_code != 404:
            response.raise_for_status()


def reconcile(api: Api, root: Path, node: str) -> None:
    classes = our_classes(api.items("/apis/storage.k8s.io/v1/storageclasses"))
    volumes = api.items("/api/v1/persistentvolumes")
    for pv in volumes_to_delete(volumes, root):
        path = Path(pv["spec"]["hostPath"]["path"])
        shutil.rmtree(path, ignore_errors=True)
        api.delete(f"/api/v1/persistentvolumes/{pv['metadata']['name']}")
        _log(f"deleted {pv['metadata']['name']} and {path}")
    if not classes:
        return
    claims = api.items("/api/v1/persistentvolumeclaims")
    for claim in claims_to_provision(claims, classes, volumes, node):
        cls = classes[claim["spec"]["storageClassName"]]
        path = volume_dir(root, claim)
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o777)
        api.create("/api/v1/persistentvolumes", volume_for_claim(claim, cls, root=root, node=node))
        meta = claim["metadata"]
        _log(f"provisioned {path} for {meta['namespace']}/{meta['name']}")


def _log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cake-cluster-provisioner")
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--interval", type=float, default=2.0)
    args = parser.parse_args(argv)
    args.root.mkdir(parents=True, exist_ok=True)
    api = Api(args.kubeconfig)
    _log(f"provisioning {PROVISIONER} volumes under {args.root} for node {args.node}")
    while True:
        try:
            reconcile(api, args.root, args.node)
        except (httpx.HTTPError, OSError, KeyError) as exc:
            _log(f"round failed, retrying: {exc!r}")
        time.sleep(args.interval)


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
