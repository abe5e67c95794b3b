"""``cake-cluster``: a real single-node Kubernetes on this machine (see tools/cluster/README.md)."""
