"""Connect to a Ray cluster by address, or start an embedded local Ray when none is given.

The address comes from `ClusterConfig.address`, else `RAY_ADDRESS`, else none: then Ray starts
in-process with this machine's CPUs. Resource detection decides the collective backend: NCCL and
`use_gpu` where the cluster has GPUs, gloo on CPU workers otherwise.
"""

from __future__ import annotations

import logging
import os
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path

from cluster.console import quiet_driver_loggers
from cluster.stopping import starting_ray
from orchestration.errors import ClusterError
from orchestration.settings import ConfigError, require
from serve_llm.net import is_loopback

logger = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class ClusterConfig:
    """Where to run. Everything else (workers, ZeRO) lives in the training config."""

    address: str | None = None  # "ray://host:10001", "host:6379" or "auto"; None -> RAY_ADDRESS or embedded
    num_cpus: int | None = None  # embedded Ray only: logical CPUs to advertise (None -> enough for the job)
    dashboard: bool = True  # embedded Ray only: start the dashboard
    dashboard_host: str = "127.0.0.1"  # embedded Ray only; 0.0.0.0 exposes it to the network
    namespace: str = "hybridtrain"
    verbose: bool = False  # echo Ray's and the workers' own logs on the terminal (they always go to the run directory)

    def __post_init__(self) -> None:
        require(self.num_cpus is None or self.num_cpus >= 1, "cluster.num_cpus", self.num_cpus, "must be >= 1")
        require(self.address is None or bool(str(self.address).strip()), "cluster.address", self.address, "must be a Ray address or unset")


@dataclass(kw_only=True, slots=True)
class ClusterInfo:
    """What we connected to."""

    address: str
    embedded: bool
    dashboard_url: str | None
    num_cpus: float
    num_gpus: float

    @property
    def use_gpu(self) -> bool:
        return self.num_gpus > 0

    @property
    def backend(self) -> str:
        """Collective backend for torch.distributed: NCCL across GPUs, gloo on CPUs."""
        return "nccl" if self.use_gpu else "gloo"


def resolve_address(config: ClusterConfig) -> str | None:
    return config.address or os.environ.get("RAY_ADDRESS") or None


EMBEDDED_DEFAULTS = {
    # Train's controller collects each epoch's report, and notices a finished worker group, only when it polls
    # (every 2 s by default): a run's end, a sweep trial's results, and a paused or exploited trial's freed CPUs all
    # wait for the next poll. Poll four times as often (a cheap call to each worker).
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # glibc gives each thread that allocates its own heap arena (up to 8 per core) and keeps what they freed: a
    # worker streaming batches through Ray Data's threads grew ~100 MB more USS over a 4 GiB epoch without this.
    "MALLOC_ARENA_MAX": "2",
    # Each process hands its metrics (hybridtrain's live series among them) to the node's agent every 10 s by
    # default: a Train worker of a short local run could end before its series ever reached Prometheus or the
    # dashboard. Every 2 s instead.
    "RAY_metrics_report_interval_ms": "2000",
}


def set_embedded_defaults() -> None:
    """Set `EMBEDDED_DEFAULTS` in this process's environment where they are unset, before it starts an embedded
    Ray (whose raylet, Train controllers and workers inherit it). `hybridtrain cluster up` starts its head node
    with them; on a cluster started otherwise, set them in each node's environment."""
    for key, value in EMBEDDED_DEFAULTS.items():
        os.environ.setdefault(key, value)


def connect(config: ClusterConfig | None = None, *, min_cpus: int = 1, quiet: bool = False) -> ClusterInfo:
    """Connect to the configured cluster or start an embedded one; print the dashboard URL.

    `min_cpus` is the number of logical CPUs the job needs at once (train workers plus helpers);
    an embedded Ray advertises at least that many so a 2-core laptop can still place 2 workers,
    the coordinator and an advisor replica (they then share the cores).
    """
    config = config or ClusterConfig()
    address = resolve_address(config)
    if address is not None:
        prepare_to_join(address)  # in effect only where Ray is not imported yet (the CLI has done it already)
    import ray

    if ray.is_initialized():
        context = ray.get_runtime_context()
        embedded = address is None
    elif address is None:
        num_cpus = config.num_cpus or max(os.cpu_count() or 1, min_cpus)
        set_embedded_defaults()
        with starting_ray():  # ray.init takes SIGTERM over; a stopping driver takes it back (`cluster.stopping`)
            context = ray.init(
                address="local",  # a new instance even when a `ray start` cluster runs on this machine (ray.init() would join it)
                num_cpus=num_cpus,
                namespace=config.namespace,
                include_dashboard=config.dashboard,
                dashboard_host=config.dashboard_host,
                logging_level=logging.WARNING,
                configure_logging=True,
                log_to_driver=config.verbose,
            )
        embedded = True
    else:
        try:
            with starting_ray():
                context = ray.init(address=address, namespace=config.namespace, logging_level=logging.WARNING, log_to_driver=config.verbose)
        except ConnectionError as error:
            raise ClusterError(f"no Ray cluster answers at {address} ({error}): start one (`hybridtrain cluster up`), or leave out "
                               "--address and RAY_ADDRESS for an embedded local Ray") from error
        embedded = False
    if not config.verbose:
        quiet_driver_loggers()
    dashboard_url = getattr(context, "dashboard_url", None) or None
    if dashboard_url and not dashboard_url.startswith("http"):
        dashboard_url = f"http://{dashboard_url}"
    resources = detect_resources()
    info = ClusterInfo(
        address=address or "embedded",
        embedded=embedded,
        dashboard_url=dashboard_url,
        num_cpus=resources["CPU"],
        num_gpus=resources["GPU"],
    )
    if not quiet:
        where = "embedded local Ray" if embedded else f"Ray cluster at {address}"
        print(
            f"[hybridtrain] {where}: {info.num_cpus:g} CPUs, {info.num_gpus:g} GPUs, backend {info.backend}; "
            f"dashboard: {dashboard_url or 'not running'}",
            flush=True,
        )
    return info


def token_path() -> Path:
    """Where Ray looks for the token file: `RAY_AUTH_TOKEN_PATH`, else `~/.ray/auth_token`."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def read_token() -> str | None:
    """The Ray auth token from the environment or the token file; None when there is none."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    try:
        return token_path().read_text().strip() or None
    except OSError:
        return None


def ensure_token() -> Path | None:
    """Make sure a Ray auth token exists; return the file it was just written to, or None when one existed already.

    A new token is 256 random bits (as `ray get-auth-token --generate` makes them), written to `token_path()` readable by
    its owner only (0600; Ray's own generator leaves the umask's bits). It is never printed: `ray get-auth-token` shows
    it to whoever needs it on another machine."""
    if read_token():
        return None
    path = token_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_hex(32))
    os.chmod(path, 0o600)  # O_CREAT's mode only holds for a file it creates; an empty one may have been there
    return path


def use_token_if_available() -> None:
    """For a command about to join an existing cluster, before Ray is imported: with `RAY_AUTH_MODE` unset and
    a token at hand (`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token`), use token mode. `ray start
    --head` turns token auth on when a token exists, but `ray.init(address=...)` sends one only in token mode
    (and fails with InvalidAuthToken). Ray reads the mode once per process, so this must run first; the CLI
    calls it, library callers set `RAY_AUTH_MODE` themselves."""
    if os.environ.get("RAY_AUTH_MODE"):
        return  # the user chose
    if read_token():
        os.environ["RAY_AUTH_MODE"] = "token"


# Ray's single-machine mode (its default on macOS and Windows), read once when Ray is imported: the node's address stays
# 127.0.0.1 and every service binds 127.0.0.1. Without it `ray start` replaces 127.0.0.1 by the machine's network address
# (`services.resolve_ip_for_localhost`) and the GCS, the raylet's node and object managers and the agents listen on every
# interface. `hybridtrain cluster up` starts a local head node in it; a driver joining that head needs it too, or Ray
# turns the address 127.0.0.1:PORT into the machine's network address, where nothing listens.
SINGLE_MACHINE = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def prepare_to_join(address: str | None) -> None:
    """For a command about to join the cluster at `address` (a Ray address, or an http(s) dashboard URL: then nothing
    to join by GCS), before Ray is imported: token mode when a token is at hand (`use_token_if_available`), and
    single-machine mode when the address is a loopback one, as a head node from `cluster up` is by default."""
    use_token_if_available()
    if address == "auto":  # the cluster `ray start` last recorded on this machine
        try:
            address = current_cluster_record().read_text().strip()
        except OSError:
            return
    host = (address or "").split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if address and not address.startswith(("http://", "https://")) and is_loopback(host):
        for name, value in SINGLE_MACHINE.items():
            os.environ.setdefault(name, value)


def current_cluster_record() -> Path:
    """Where `ray start` records its address (`ray stop` removes it); a bare `ray.init()` or address "auto" joins it."""
    return Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"


def detect_resources() -> dict[str, float]:
    """Total CPUs and GPUs the connected cluster advertises."""
    import ray

    total = ray.cluster_resources()
    return {"CPU": float(total.get("CPU", 0.0)), "GPU": float(total.get("GPU", 0.0))}


def nodes_not_seeing(path: Path) -> list[str]:
    """The alive nodes of the connected cluster on which `path` (a directory this process wrote) is not
    visible: a marker file is written here and looked for by a zero-CPU task pinned to each node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
    if len(nodes) <= 1:
        return []
    token = uuid.uuid4().hex
    marker = path / f".hybridtrain-storage-check-{token}"
    marker.write_text(token)
    try:
        probe = ray.remote(num_cpus=0)(_read_marker)
        seen = ray.get([probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(str(marker))
                        for node in nodes], timeout=120)
    finally:
        marker.unlink(missing_ok=True)
    return [node for node, text in zip(nodes, seen) if text != token]


def check_shared_storage(path: Path, info: ClusterInfo) -> None:
    """On a cluster of several nodes, `path` must be storage every node shares (NFS or another shared
    mount): workers on any node write checkpoints and run files there, and trials read each other's
    checkpoints. Raise a `ConfigError` naming the nodes that cannot see it; an embedded Ray is one machine."""
    if info.embedded:
        return
    blind = nodes_not_seeing(path)
    if blind:
        raise ConfigError(f"output directory {str(path)!r} is not shared storage: {len(blind)} node(s) of the cluster at {info.address} "
                          f"cannot see it ({', '.join(node[:12] for node in blind)}). On a multi-node cluster, --output must be a "
                          "directory every node mounts at the same path (for example NFS).")


def _read_marker(path: str) -> str | None:
    marker = Path(path)
    return marker.read_text() if marker.is_file() else None
