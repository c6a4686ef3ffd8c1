"""Shared fixtures, named for what they start."""

from __future__ import annotations

import os

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

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=True)
    return ray
