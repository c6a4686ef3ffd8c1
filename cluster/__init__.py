"""The application a user runs against a Ray cluster: the `hybridtrain` CLI, config composition, launching runs (`plan_run`, `execute_run`), predict, and connecting to Ray (or starting an embedded one)."""

from cluster.runtime import ClusterConfig, ClusterInfo, connect, detect_resources

__all__ = ["ClusterConfig", "ClusterInfo", "connect", "detect_resources"]
