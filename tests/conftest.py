"""Shared fixtures, named for what they start."""

from __future__ import annotations

import os
import socket

import pytest

# Runs here have no hub access; make any accidental hub call fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def _ray_session():
    """Shuts down whatever Ray and Serve the session's tests left running."""
    yield
    import ray

    if ray.is_initialized():
        try:
            from ray import serve

            serve.shutdown()
        except Exception:  # noqa: BLE001 - Serve may never have started
            pass
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_local(_ray_session):
    """An embedded local Ray with more logical CPUs than cores, so that 2 train workers,
    the coordinator and an advisor replica fit at once on a 2-core CI machine. Started once and
    shared; started again for a module after one that shut it down (the multi-node test runs its own cluster)."""
    import ray

    from cluster.runtime import set_embedded_defaults

    if not ray.is_initialized():
        set_embedded_defaults()  # as `hybridtrain run` starts its embedded Ray
        ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=True)
    return ray


def _single_process_env(port: int) -> dict[str, str]:
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}


@pytest.fixture(scope="session")
def _process_group():
    """A gloo process group of one (rank 0 of 1) in this process. One per session: DeepSpeed keeps the first
    group it sees, so a second group in the same process breaks it. Yields its environment."""
    import torch.distributed as dist

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = _single_process_env(port)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield env  # the variables are set only while a module uses the group: a Ray started later must not inherit them
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def single_process_group(_process_group):
    """The session's process group of one, with its environment set for this module (DeepSpeed engines without Ray)."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in _process_group.items():
            patch.setenv(key, value)
        yield


class Answers:
    """An advisor port whose futures the test answers (`advisor.futures[i][1].set_result(...)`)."""

    def __init__(self) -> None:
        self.futures: list = []  # (snapshot, Future) per query, in order

    def submit(self, snapshot):
        from concurrent.futures import Future

        future: Future = Future()
        self.futures.append((snapshot, future))
        return future


@pytest.fixture
def answers() -> Answers:
    """A fresh `Answers` advisor port for a coordinator under test."""
    return Answers()
