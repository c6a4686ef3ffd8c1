"""The Ray Serve deployment: a thin shell that batches snapshots into one backend call.

All advice logic lives in the backend (`backends.py`); this file only adds what serving needs:
request batching (`@serve.batch`, so many runs share one replica and one `generate`), a
per-request deadline that answers `status="timeout"` instead of hanging, health checks, an HTTP
route, and sizing (replicas, autoscaling, CPUs/GPUs per replica) from `AdvisorConfig`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from orchestration.errors import HybridtrainError

from serve_llm.backends import make_backend
from serve_llm.config import AdvisorConfig
from serve_llm.net import is_loopback
from orchestration.protocol import TrainingSnapshot
from serve_llm.validate import AdvisorResponse

logger = logging.getLogger(__name__)

# The histories of a snapshot, as paths into its JSON: each may hold at most `AdvisorConfig.max_history` entries.
HISTORIES = (("train_loss",), ("val_loss",), ("train_accuracy",), ("val_accuracy",), ("recent_proposals",),
             ("modes", "free_values", "history"))


@dataclass(frozen=True, slots=True)
class Refusal:
    """A POST the HTTP route answers with a 4xx and its reason, without asking the backend."""

    status_code: int
    error: str


def refuse_declared_length(content_length: str | None, max_bytes: int) -> Refusal | None:
    """Refuse (413) a body whose announced length passes `max_bytes`, before any of it is read."""
    if content_length is not None and content_length.strip().isdigit() and int(content_length) > max_bytes:
        return Refusal(413, f"body of {int(content_length)} bytes is over advisor.max_request_bytes={max_bytes}")
    return None


def parse_posted_snapshot(body: bytes, *, max_bytes: int, max_history: int) -> dict[str, Any] | Refusal:
    """The snapshot dict a POST carries, checked before it costs anything, or why it is refused: over `max_bytes`
    (413), not a JSON object (400; nesting too deep to parse counts as not JSON), a history longer than
    `max_history` entries (422)."""
    if len(body) > max_bytes:
        return Refusal(413, f"body of {len(body)} bytes is over advisor.max_request_bytes={max_bytes}")
    try:
        snapshot = json.loads(body)
    except (ValueError, RecursionError) as error:
        return Refusal(400, f"body is not JSON: {type(error).__name__}: {str(error)[:200]}")
    if not isinstance(snapshot, dict):
        return Refusal(400, f"body must be a JSON object (a snapshot), got {type(snapshot).__name__}")
    for path in HISTORIES:
        value: Any = snapshot
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, list) and len(value) > max_history:
            return Refusal(422, f"snapshot {'.'.join(path)} has {len(value)} entries, over advisor.max_history={max_history}")
    return snapshot


async def read_limited(chunks: Any, max_bytes: int) -> bytes | Refusal:
    """The body from an async iterator of chunks (starlette's `request.stream()`), or a refusal (413) as soon as it
    passes `max_bytes`: a body without a length, or longer than it announced, is never read whole."""
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > max_bytes:
            return Refusal(413, f"body is over advisor.max_request_bytes={max_bytes}")
    return bytes(body)


DEPLOYMENT_NAME = "AdvisorDeployment"
HEALTH_CHECK_PERIOD_S = 10.0
HEALTH_CHECK_TIMEOUT_S = 60.0  # a replica busy in generate() answers health checks late, not never


@serve.deployment(name=DEPLOYMENT_NAME, health_check_period_s=HEALTH_CHECK_PERIOD_S,
                  health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S)
class AdvisorDeployment:
    """Serve replica around one advisor backend.

    Python callers use `propose(snapshot_dict) -> response_dict` through a DeploymentHandle;
    HTTP callers POST a snapshot JSON to the route prefix (GET answers a health summary).
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self._config = AdvisorConfig.from_dict(config)
        if self._config.nice:
            # Advice is worth less than the training it advises: where they share CPU cores, the
            # replica takes what training leaves idle (e.g. while an epoch boundary waits for it).
            os.nice(self._config.nice)
        self._backend = make_backend(self._config)
        self._propose_batched.set_max_batch_size(self._config.max_batch_size)
        self._propose_batched.set_batch_wait_timeout_s(self._config.batch_wait_timeout_s)
        self._served = 0
        self._timeouts = 0
        self._cpu_priority = f"nice {self._config.nice}"
        self._idle_cpu = self._config.wants_idle_cpu
        self._run_lock = threading.Lock()  # one backend call at a time, even after a timed-out batch
        logger.info("advisor replica ready: backend=%s model=%s", self._backend.name, self._backend.model)

    def _lower_compute_threads(self, keep: int) -> None:
        """Put every thread of this process except `keep` (the event loop's, which answers health checks)
        under SCHED_IDLE; threads the backend starts later (torch's pool) inherit it from the caller.
        Where the kernel refuses, say so once and stay at `nice`: the answer then competes with training."""
        if not self._idle_cpu:
            return
        try:
            idle = os.sched_param(0)
            for tid in os.listdir("/proc/self/task"):
                if int(tid) != keep and os.sched_getscheduler(int(tid)) != os.SCHED_IDLE:
                    try:
                        os.sched_setscheduler(int(tid), os.SCHED_IDLE, idle)
                    except ProcessLookupError:
                        pass  # the thread ended meanwhile
            self._cpu_priority = "idle (SCHED_IDLE)"
        except (AttributeError, OSError) as error:
            self._idle_cpu = False
            self._cpu_priority = f"nice {self._config.nice} (SCHED_IDLE unavailable: {error})"
            logger.warning("advisor replica: cannot run at idle CPU priority (%s); staying at nice %d, so answers "
                           "compete with training for CPU", error, self._config.nice)

    def _run_backend(self, items: list[tuple[TrainingSnapshot, float]], loop_thread: int = 0) -> list[AdvisorResponse]:
        """Runs in a worker thread. Requests whose deadline passed while queued are answered as
        timeouts without being computed, so a backlog does not snowball."""
        self._lower_compute_threads(keep=loop_thread)
        with self._run_lock:
            now = time.monotonic()
            live = [index for index, (_, deadline) in enumerate(items) if deadline > now]
            responses: list[AdvisorResponse] = [
                self._timeout_response(0.0, "deadline passed while queued") for _ in items
            ]
            if live:
                answered = self._backend.propose_batch([items[index][0] for index in live])
                for index, response in zip(live, answered):
                    responses[index] = response
            return responses

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _propose_batched(self, items: list[tuple[TrainingSnapshot, float]]) -> list[AdvisorResponse]:
        # The backend is blocking CPU/GPU work: run it off the event loop so that health checks
        # and deadlines keep being served while it generates.
        return await asyncio.to_thread(self._run_backend, items, threading.get_native_id())

    def _timeout_response(self, latency_s: float, detail: str) -> AdvisorResponse:
        return AdvisorResponse.failure(
            "timeout", f"no answer within request_timeout_s={self._config.request_timeout_s}s ({detail})",
            latency_s=latency_s, backend=self._backend.name, model=self._backend.model,
        )

    async def propose(self, snapshot: dict[str, Any]) -> dict[str, Any]:
        """Answer one snapshot (a possibly partial `TrainingSnapshot` dict) with a response dict."""
        started = time.monotonic()
        try:
            parsed = TrainingSnapshot.from_dict(snapshot)
        except (TypeError, ValueError) as error:
            return AdvisorResponse.failure(
                "error", f"bad snapshot: {error}", backend=self._backend.name, model=self._backend.model
            ).to_dict()
        deadline = started + self._config.request_timeout_s
        try:
            response = await asyncio.wait_for(
                self._propose_batched((parsed, deadline)), timeout=self._config.request_timeout_s
            )
        except TimeoutError:
            self._timeouts += 1
            logger.warning("advisor request for run %s timed out", parsed.run_id)
            response = self._timeout_response(time.monotonic() - started, "generation still running")
        except Exception as error:  # noqa: BLE001 - the caller gets a recorded error, never an exception
            logger.exception("advisor request for run %s failed", parsed.run_id)
            response = AdvisorResponse.failure(
                "error", f"backend failed: {type(error).__name__}: {error}",
                latency_s=time.monotonic() - started, backend=self._backend.name, model=self._backend.model,
            )
        self._served += 1
        return response.to_dict()

    def health(self) -> dict[str, Any]:
        """A small status summary (also served on GET)."""
        return {
            "status": "ok",
            "backend": self._backend.name,
            "model": self._backend.model,
            "served": self._served,
            "timeouts": self._timeouts,
            "max_batch_size": self._config.max_batch_size,
            "torch_threads": getattr(self._backend, "torch_threads", None),
            "cpu_priority": self._cpu_priority,
        }

    def check_health(self) -> None:
        """Serve's liveness probe: the backend object must exist (a failed load never gets here)."""
        if self._backend is None:
            raise RuntimeError("advisor backend is not loaded")

    async def __call__(self, request: Any) -> Any:
        """HTTP: GET -> health JSON; POST a snapshot JSON -> response JSON. A body over `max_request_bytes` (413), not a
        JSON object (400) or with a history over `max_history` entries (422) is refused before the backend sees it."""
        from starlette.responses import JSONResponse

        if request.method == "GET":
            return JSONResponse(self.health())
        if request.method != "POST":
            return JSONResponse({"error": f"method {request.method} not allowed"}, status_code=405)
        limit = self._config.max_request_bytes
        snapshot = refuse_declared_length(request.headers.get("content-length"), limit)
        if snapshot is None:
            body = await read_limited(request.stream(), limit)
            snapshot = body if isinstance(body, Refusal) else parse_posted_snapshot(body, max_bytes=limit,
                                                                                   max_history=self._config.max_history)
        if isinstance(snapshot, Refusal):
            return JSONResponse({"error": snapshot.error}, status_code=snapshot.status_code)
        return JSONResponse(await self.propose(snapshot))


def deployment_options(config: AdvisorConfig) -> dict[str, Any]:
    """`.options(...)` for the deployment, from the config.

    Ray Serve 2.60 defaults `max_ongoing_requests` to 5, which would cap every batch at 5: it
    is raised to twice the batch size, so one batch can queue while the previous one runs.
    """
    options: dict[str, Any] = {
        "ray_actor_options": {
            "num_cpus": config.num_cpus_per_replica,
            "num_gpus": config.num_gpus_per_replica,
        },
        "max_ongoing_requests": 2 * config.max_batch_size,
    }
    if config.num_replicas == "auto":
        options["autoscaling_config"] = {
            "min_replicas": 1,
            "max_replicas": config.max_replicas,
            "target_ongoing_requests": config.max_batch_size,
        }
    else:
        options["num_replicas"] = config.num_replicas
    return options


def http_url(config: AdvisorConfig) -> str:
    """Where the HTTP route answers."""
    return f"http://{config.http_host}:{config.http_port}{config.route_prefix}"


def deploy_advisor(config: AdvisorConfig, *, http: bool = True, wait: bool = True) -> DeploymentHandle:
    """Deploy the advisor app on the current Ray cluster (ray.init already called) and return its
    handle once every replica has loaded its backend, or, without `wait`, as soon as Serve has the
    application (its replicas load the model meanwhile: `wait_for_advisor` says when they are up or why not;
    requests sent before then wait in Serve's router).

    With `http`, Serve starts its HTTP proxy bound to `config.http_host` (127.0.0.1 by default: Serve's own
    default host is configurable by environment and may differ) and the app answers at `http_url(config)`.
    Without it (runs and sweeps, which reach the advisor through its handle) no proxy starts: no port is
    opened, and two runs on one machine do not contend for 127.0.0.1:8000. If Serve is already running,
    its proxy settings are kept as they are.
    """
    if config.backend == "none":
        raise ValueError("AdvisorConfig.backend='none' means no advisor: there is nothing to deploy")
    if http:
        if not is_loopback(config.http_host):
            logger.warning("the advisor's HTTP route listens on %s (advisor.http_host), reachable from other machines: it has no "
                           "authentication, so anyone who reaches port %d can use this advisor", config.http_host, config.http_port)
        serve.start(http_options={"host": config.http_host, "port": config.http_port})
        _require_proxy()
    else:
        serve.start(proxy_location="Disabled")
    app = AdvisorDeployment.options(**deployment_options(config)).bind(config.to_dict())
    started = time.perf_counter()
    route_prefix = config.route_prefix if http else None
    if not wait:
        [handle] = serve.run_many([serve.RunTarget(app, name=config.app_name, route_prefix=route_prefix)], wait_for_applications_running=False)
        logger.info("advisor app %r (%s) deploying (not waited for)", config.app_name, config.backend)
        return handle
    handle = serve.run(app, name=config.app_name, route_prefix=route_prefix, blocking=False)
    logger.info("advisor app %r (%s) up in %.1fs%s", config.app_name, config.backend, time.perf_counter() - started,
                f" at {http_url(config)}" if http else " (handle only, no HTTP)")
    return handle


def _first_and_last_lines(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return " ... ".join(dict.fromkeys([lines[0][:300], lines[-1][:500]])) if lines else ""


class AdvisorDeployError(HybridtrainError, RuntimeError):
    """The advisor's Serve application failed to deploy (its replicas could not start or load the model) or is gone."""


def wait_for_advisor(config: AdvisorConfig, *, timeout_s: float, poll_s: float = 0.25) -> float:
    """Block until the advisor's application is RUNNING on Serve; return the seconds waited.

    Raises `AdvisorDeployError` with Serve's own message when the application failed to deploy, became
    unhealthy or is not there (deleted, or never deployed), and `TimeoutError` after `timeout_s`.
    """
    from ray.serve.schema import ApplicationStatus

    started = time.monotonic()
    while True:
        application = serve.status().applications.get(config.app_name)
        if application is None:
            raise AdvisorDeployError(f"Serve has no application {config.app_name!r} (deleted, or never deployed)")
        if application.status == ApplicationStatus.RUNNING:
            return time.monotonic() - started
        if application.status in (ApplicationStatus.DEPLOY_FAILED, ApplicationStatus.UNHEALTHY, ApplicationStatus.DELETING):
            # The application's own message only names the deployment; each deployment's holds the replica's traceback,
            # whose last line is the error itself (the rest is in the Serve controller's log)
            details = [str(application.message or "")] + [f"{name}: {_first_and_last_lines(status.message)}"
                                                          for name, status in application.deployments.items() if status.message]
            message = " ".join(" ".join(details).split())[:2000] or "(Serve gave no message)"
            raise AdvisorDeployError(f"the advisor's Serve application {config.app_name!r} is {application.status.value}: {message}")
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"the advisor's Serve application {config.app_name!r} was not running {timeout_s:g}s after it was deployed "
                               f"(status {application.status.value}; advisor.deploy_timeout_s)")
        time.sleep(poll_s)


def _require_proxy(timeout_s: float = 30.0) -> None:
    """Serve keeps the proxy settings it was started with: one started by a run (handle only) has no proxy."""
    deadline = time.monotonic() + timeout_s
    while not serve.status().proxies:
        if time.monotonic() > deadline:
            raise RuntimeError("Ray Serve is already running on this cluster without an HTTP proxy (a training run started it to "
                               "reach the advisor through its handle), so the advisor cannot answer over HTTP; shut Serve down "
                               "(`serve shutdown`, or let the run end) and start the advisor again")
        time.sleep(0.5)


def get_advisor_handle(config: AdvisorConfig) -> DeploymentHandle:
    """The handle of an already deployed advisor app (raises if it is not deployed)."""
    return serve.get_app_handle(config.app_name)


def is_deployed(config: AdvisorConfig) -> bool:
    """True when the advisor app is deployed and running on the connected cluster."""
    from ray.serve.schema import ApplicationStatus

    application = serve.status().applications.get(config.app_name)  # empty when Serve is not running
    return application is not None and application.status == ApplicationStatus.RUNNING
