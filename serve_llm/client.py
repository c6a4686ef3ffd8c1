"""Clients the coordinator uses to ask the advisor, blocking (`ask`) or not (`submit`).

Both clients have the same API and never raise for advisor trouble: a timeout or an error comes
back as an `AdvisorResponse` with status "timeout" or "error", so a training loop can poll
`future.done()` at epoch ends and carry on whatever happened. Both pickle (the thread pool is
rebuilt lazily), so a coordinator actor can receive one or build one from its `AdvisorConfig`.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from typing import Any

from serve_llm.config import AdvisorConfig
from orchestration.protocol import TrainingSnapshot
from serve_llm.validate import AdvisorResponse

logger = logging.getLogger(__name__)

CLIENT_GRACE_S = 5.0  # the client waits this much longer than the server's own deadline
SUBMIT_THREADS = 4  # concurrent outstanding `submit`s per client; Serve batches them server-side


def _as_snapshot_dict(snapshot: TrainingSnapshot | dict[str, Any]) -> dict[str, Any]:
    return snapshot.to_dict() if isinstance(snapshot, TrainingSnapshot) else dict(snapshot)


class _PooledClient:
    """`submit` on top of a blocking `ask`, with a lazily built (and unpickled) thread pool."""

    def __init__(self) -> None:
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def ask(self, snapshot: TrainingSnapshot | dict[str, Any], timeout_s: float | None = None) -> AdvisorResponse:
        raise NotImplementedError

    def submit(self, snapshot: TrainingSnapshot | dict[str, Any]) -> concurrent.futures.Future[AdvisorResponse]:
        """Ask without blocking; the future always resolves to a response (never an exception)."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=SUBMIT_THREADS, thread_name_prefix="advisor-client"
                )
        return self._pool.submit(self.ask, snapshot)

    def close(self) -> None:
        """Stop the submit threads (outstanding futures still complete)."""
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False)
                self._pool = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_pool"] = None
        state.pop("_pool_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pool_lock = threading.Lock()


class AdvisorClient(_PooledClient):
    """Talks to the deployed advisor app through a Serve DeploymentHandle.

    The handle is looked up by app name on first use, so the client can be built (or unpickled)
    inside a Ray actor on any node of the cluster the app was deployed on.
    """

    def __init__(self, config: AdvisorConfig, handle: Any | None = None) -> None:
        super().__init__()
        self.config = config
        self._handle = handle
        # A run deploys its advisor without waiting for the model to load (`deploy_advisor(wait=False)`): the first
        # question waits for the replicas, outside its own timeout. A handle passed in belongs to a running app.
        self._running = handle is not None
        self._deploy_failure: str | None = None
        self._ready_lock = threading.Lock()

    def _get_handle(self) -> Any:
        if self._handle is None:
            from serve_llm.deployment import get_advisor_handle

            self._handle = get_advisor_handle(self.config)
        return self._handle

    def _await_replicas(self) -> AdvisorResponse | None:
        """None once the application runs (checked once per client); else the failure to record for this question:
        a deployment that failed stays failed, a wait that ran out (`advisor.deploy_timeout_s`) is tried again next time."""
        from serve_llm.deployment import AdvisorDeployError, wait_for_advisor

        with self._ready_lock:
            if self._running:
                return None
            labels = {"backend": self.config.backend, "model": self.config.model_label()}
            if self._deploy_failure is None:
                try:
                    waited = wait_for_advisor(self.config, timeout_s=self.config.deploy_timeout_s)
                except AdvisorDeployError as error:
                    self._deploy_failure = str(error)
                except TimeoutError as error:
                    return AdvisorResponse.failure("timeout", str(error), latency_s=self.config.deploy_timeout_s, **labels)
                else:
                    if waited > 1.0:
                        logger.info("advisor %r running after %.1fs; asking it now", self.config.app_name, waited)
                    self._running = True
                    return None
            return AdvisorResponse.failure("error", self._deploy_failure, latency_s=0.0, **labels)

    def ask(self, snapshot: TrainingSnapshot | dict[str, Any], timeout_s: float | None = None) -> AdvisorResponse:
        """Block until the advisor answers or `timeout_s` (default: the server's deadline plus a
        grace) passes; a timeout comes back as status "timeout". A question asked while the advisor's
        replicas still load waits for them first (up to `advisor.deploy_timeout_s`, not counted in `timeout_s`)."""
        not_running = self._await_replicas()
        if not_running is not None:
            return not_running
        wait_s = timeout_s if timeout_s is not None else self.config.request_timeout_s + CLIENT_GRACE_S
        started = time.perf_counter()
        labels = {"backend": self.config.backend, "model": self.config.model_label()}
        try:
            result = self._get_handle().propose.remote(_as_snapshot_dict(snapshot)).result(timeout_s=wait_s)
            return AdvisorResponse.from_dict(result)
        except TimeoutError:
            return AdvisorResponse.failure(
                "timeout", f"client gave up after {wait_s:g}s", latency_s=time.perf_counter() - started, **labels
            )
        except Exception as error:  # noqa: BLE001 - advisor trouble is a recorded response, not a crash
            logger.warning("advisor request failed: %s: %s", type(error).__name__, error)
            return AdvisorResponse.failure(
                "error", f"advisor call failed: {type(error).__name__}: {error}",
                latency_s=time.perf_counter() - started, **labels,
            )

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_handle"] = None  # looked up again by app name where it is unpickled
        state.pop("_ready_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._ready_lock = threading.Lock()


class LocalAdvisorClient(_PooledClient):
    """Runs a backend in this process (heuristic or scripted), with the same API as
    `AdvisorClient`: for unit tests and for advice that needs no model server."""

    def __init__(self, backend: Any, *, request_timeout_s: float = 60.0) -> None:
        super().__init__()
        self.backend = backend
        self.request_timeout_s = request_timeout_s
        self._call_pool: concurrent.futures.ThreadPoolExecutor | None = None

    def _answer(self, snapshot: TrainingSnapshot | dict[str, Any]) -> AdvisorResponse:
        started = time.perf_counter()
        labels = {"backend": self.backend.name, "model": self.backend.model}
        try:
            parsed = snapshot if isinstance(snapshot, TrainingSnapshot) else TrainingSnapshot.from_dict(snapshot)
        except (TypeError, ValueError) as error:
            return AdvisorResponse.failure("error", f"bad snapshot: {error}", **labels)
        try:
            return self.backend.propose_batch([parsed])[0]
        except Exception as error:  # noqa: BLE001 - advisor trouble is a recorded response, not a crash
            logger.warning("local advisor failed: %s: %s", type(error).__name__, error)
            return AdvisorResponse.failure(
                "error", f"backend failed: {type(error).__name__}: {error}",
                latency_s=time.perf_counter() - started, **labels,
            )

    def ask(self, snapshot: TrainingSnapshot | dict[str, Any], timeout_s: float | None = None) -> AdvisorResponse:
        """Answer in-process; past `timeout_s` (default `request_timeout_s`) the answer is
        abandoned and a "timeout" response returned."""
        wait_s = timeout_s if timeout_s is not None else self.request_timeout_s
        started = time.perf_counter()
        with self._pool_lock:
            if self._call_pool is None:
                self._call_pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=SUBMIT_THREADS, thread_name_prefix="advisor-local"
                )
        future = self._call_pool.submit(self._answer, snapshot)
        try:
            return future.result(timeout=wait_s)
        except concurrent.futures.TimeoutError:
            return AdvisorResponse.failure(
                "timeout", f"local advisor gave up after {wait_s:g}s", latency_s=time.perf_counter() - started,
                backend=self.backend.name, model=self.backend.model,
            )

    def close(self) -> None:
        super().close()
        with self._pool_lock:
            if self._call_pool is not None:
                self._call_pool.shutdown(wait=False)
                self._call_pool = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_call_pool"] = None
        return state


def make_client(config: AdvisorConfig) -> AdvisorClient | LocalAdvisorClient:
    """The client for `config`: model backends (smollm2, hf, openai) go through the Serve app,
    which must already be deployed (`deploy_advisor`); heuristic and scripted run in-process.
    Backend "none" is refused: it means the coordinator uses no advisor."""
    if config.backend == "none":
        raise ValueError("AdvisorConfig.backend='none' means no advisor: there is no client to build")
    if config.is_served:
        return AdvisorClient(config)
    from serve_llm.backends import make_backend

    return LocalAdvisorClient(make_backend(config), request_timeout_s=config.request_timeout_s)
