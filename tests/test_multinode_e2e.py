"""A sweep across machines, simulated on this one: Ray's own `ray.cluster_utils.Cluster` starts a head
and two worker nodes (separate raylets with their own resources), and a 2-trial PBT sweep runs on it
through `--address`, exactly as on a real cluster.

The head advertises no CPUs, so trials and their Train workers go to the worker nodes; a trial's
worker group (2 x 0.75 CPU) fits on one worker node but two do not, so the trials train on different
nodes. When PBT exploits, the exploited trial restarts from the better trial's checkpoint: if the
better trial is still running, on the other node; if PBT paused it too (asynchronous PBT pauses a
trial that reaches its boundary while another is pending), both restart and each takes one node,
so one of the two restarts reads a checkpoint written on the other node. Either way a checkpoint
crosses nodes, which every run records (`restored_from.json`: written_on / read_on). The advisor
(served on Ray Serve) and the one coordinator actor are reached from both."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from cluster.experiment import build_config
from cluster.sweep import run_sweep

pytestmark = pytest.mark.e2e


def _worker_nodes(run_dir: Path) -> set[str]:
    return {worker["node_id"] for worker in json.loads((run_dir / "placement.json").read_text())["workers"]}


def test_a_pbt_sweep_spans_a_multi_node_cluster(tmp_path) -> None:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # the session's embedded Ray (other tests start it again when they need it)
        serve.shutdown()
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]  # one trial's worker group each
    cluster.wait_for_nodes()
    try:
        script = tmp_path / "advisor.json"
        script.write_text(json.dumps([{"hyperparameters": {"lr_scale": 0.5}, "reason": "halve lr"},
                                      {"weights": [{"op": "shrink", "group": "classifier.weight", "amount": 0.05}], "reason": "shrink"}]))
        config = build_config(recipe="smoke", sweep=True, overrides=[
            "tune.num_samples=2", "tune.quantile_fraction=0.5", "train.cpus_per_worker=0.75", "train.epochs=8", "tune.space={train.lr: {loguniform: [1.0e-5, 1.0e-2]}}",
            "advisor.backend=scripted", "advisor.serve=true", f"advisor.script={script}", "advisor.num_cpus_per_replica=0",
            "coordinator.probation_steps=2", "coordinator.query_interval=2", "coordinator.ask_when_healthy=true"])
        sweep_dir = tmp_path / "sweep"
        summary = run_sweep(config, sweep_dir, address=cluster.address)
        head = cluster.head_node.node_id
        worker_node_ids = {node.node_id for node in workers}

        runs = sorted(sweep_dir.glob("trials/*/run-*"))
        results = pd.read_csv(sweep_dir / "results.csv")
        assert summary["trials"] == 2 and (results.status != "error").all(), results.to_string()
        # Every worker group ran whole on one worker node (never the head), and both worker nodes were used.
        placements = {run: _worker_nodes(run) for run in runs}
        assert all(len(nodes) == 1 and nodes <= worker_node_ids for nodes in placements.values()), (placements, head)
        assert set().union(*placements.values()) == worker_node_ids, placements
        # The one coordinator actor served every run of both trials, and the served advisor answered them.
        coordinator = summary["coordinator"]
        assert coordinator["runs_opened"] == len(runs), (coordinator, runs)
        for run in runs:
            if (run / "summary.json").is_file():
                kinds = set(pd.read_csv(run / "interventions.csv").kind)
                assert "query" in kinds or "cache_hit" in kinds, (run, kinds)
        # Exploits cloned the better trial's weights, and a checkpoint crossed nodes (see the module docstring).
        explores = pd.read_csv(sweep_dir / "explores.csv")
        assert summary["exploits"] >= 1 and len(explores) >= 1, summary
        for row in explores.itertuples():
            restored = json.loads((Path(row.run_dir) / "restored_from.json").read_text())
            assert restored["params_sha256"] == json.loads((Path(row.checkpoint) / "loop_state.json").read_text())["params_digest"]
        starts = [json.loads(path.read_text()) for path in sweep_dir.glob("trials/*/run-*/restored_from.json")]
        assert all(start["written_on"] and start["read_on"] for start in starts), starts
        assert any(set(start["written_on"]).isdisjoint(start["read_on"]) for start in starts), (starts, placements)
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.parametrize("embedded", [True, False])
def test_a_remote_cluster_given_a_path_some_nodes_cannot_see_fails_clearly(tmp_path, monkeypatch, embedded) -> None:
    """The probe itself runs in the multi-node test above (every simulated node shares this disk); here a
    node that cannot see the output directory is simulated, to check what the user is told."""
    from cluster import runtime
    from orchestration.settings import ConfigError

    monkeypatch.setattr(runtime, "nodes_not_seeing", lambda path: ["a1b2c3d4e5f6a7b8"])
    info = runtime.ClusterInfo(address="10.0.0.1:6379", embedded=embedded, dashboard_url=None, num_cpus=8, num_gpus=0)
    if embedded:
        runtime.check_shared_storage(tmp_path, info)  # one machine: nothing to check
    else:
        with pytest.raises(ConfigError, match=r"not shared storage: 1 node\(s\) .* cannot see it \(a1b2c3d4e5f6\).*every node mounts"):
            runtime.check_shared_storage(tmp_path, info)
