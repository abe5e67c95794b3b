"""The one exception the cluster tooling raises for a failure it can explain."""

from __future__ import annotations


class ClusterError(Exception):
    """A step failed; the message says which and, when known, what to do."""
