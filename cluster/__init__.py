"""Connecting to a Ray cluster (or starting an embedded one) and reading what it offers."""

from cluster.runtime import ClusterConfig, ClusterInfo, connect, detect_resources

__all__ = ["ClusterConfig", "ClusterInfo", "connect", "detect_resources"]
