"""Neuron-group coupling (`coordinator.neuron_groups`): groups from activation statistics, one alpha per group,
proposals per group. Each part on its own, then the coordinator and a real DeepSpeed engine."""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future

import numpy as np
import pytest
import torch

from orchestration.alphas import AlphaController
from orchestration.config import CoordinatorConfig
from orchestration.coordinator import Coordinator
from orchestration.menu import build_menu, neuron_group_keys
from orchestration.protocol import AdvisorResponse, Apply, Diagnosis, LayerStats, ProbationMetrics, Proposal, TrainingSnapshot, WeightOp
from serve_llm.validate import validate_proposal
from workers.blending import apply_weight_ops
from workers.coupling import describe_groups, group_count, kmeans, unit_groups

DESCRIBED = {"fc1": [{"size": 2, "active": 0.0, "mean": -1.0}, {"size": 2, "active": 0.6, "mean": 0.5}]}


def _stats(dead: int, alive: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([np.c_[rng.normal(-2, 0.1, dead), np.zeros(dead)], np.c_[rng.normal(1, 0.4, alive), rng.uniform(0.2, 0.9, alive)]])


def test_the_number_of_groups_grows_with_the_log_of_the_width() -> None:
    assert [group_count(width) for width in (1, 2, 32, 128, 256, 4096)] == [1, 1, 5, 7, 8, 12]


def test_dead_units_form_group_zero_and_clustering_is_deterministic() -> None:
    stats = _stats(dead=10, alive=54)
    labels = unit_groups({"fc1": stats}, seed=3)["fc1"]
    assert labels.max() + 1 == 6 and set(labels[:10]) == {0} and 0 not in labels[10:]
    assert np.array_equal(labels, unit_groups({"fc1": stats}, seed=3)["fc1"])
    described = describe_groups(labels, stats)
    assert described[0] == {"size": 10, "active": 0.0, "mean": pytest.approx(stats[:10, 0].mean(), abs=1e-4)}
    assert [group["active"] for group in described] == sorted(group["active"] for group in described)  # quietest first
    assert np.array_equal(kmeans(np.arange(6.0)[:, None], 2, seed=0), [0, 0, 0, 1, 1, 1])


def test_an_op_on_a_neuron_group_changes_only_its_rows_and_each_group_blends_with_its_own_alpha() -> None:
    weight = torch.arange(12.0).reshape(4, 3)
    groups = {"fc1": np.array([0, 1, 0, 1])}
    only_one, _ = apply_weight_ops({"fc1.weight": weight}, [WeightOp(op="shrink", group="fc1.weight#1", amount=0.5)],
                                   {"fc1.weight#1": 1.0}, seed=0, unit_groups=groups)
    assert torch.equal(only_one["fc1.weight"][[0, 2]], weight[[0, 2]]) and torch.equal(only_one["fc1.weight"][[1, 3]], weight[[1, 3]] * 0.5)
    per_group, _ = apply_weight_ops({"fc1.weight": weight}, [WeightOp(op="shrink", group="fc1.weight", amount=0.5)],
                                    {"fc1.weight#0": 0.0, "fc1.weight#1": 0.5}, seed=0, unit_groups=groups)
    assert torch.equal(per_group["fc1.weight"][[0, 2]], weight[[0, 2]])  # alpha 0: bit for bit
    assert torch.allclose(per_group["fc1.weight"][[1, 3]], weight[[1, 3]] * 0.75)


def test_the_coordinator_gives_and_adapts_one_alpha_per_neuron_group() -> None:
    keys = neuron_group_keys("fc1.weight", DESCRIBED)
    assert keys == ["fc1.weight#0", "fc1.weight#1"] and neuron_group_keys("fc1.weight#1", DESCRIBED) == ["fc1.weight#1"]
    assert neuron_group_keys("head.weight", DESCRIBED) == ["head.weight"]
    controller = AlphaController.from_config(CoordinatorConfig())
    controller.update(["fc1.weight#1"], accepted=True)  # an earlier proposal on group 1 was kept
    alphas = controller.for_proposal(Proposal(weights=[WeightOp(op="shrink", group="fc1.weight", amount=0.1)]),
                                     expand=lambda group: neuron_group_keys(group, DESCRIBED))
    assert alphas == {"fc1.weight#0": 0.1, "fc1.weight#1": pytest.approx(0.15)}

    class Advisor:
        def submit(self, snapshot):
            future = Future()
            future.set_result(AdvisorResponse(status="valid", proposal=Proposal(weights=[WeightOp(op="noise", group="fc1.weight#0", amount=0.1)]),
                                              backend="t", model="t"))
            return future

    coordinator = Coordinator(CoordinatorConfig(query_interval=1, burn_in_epochs=0, neuron_groups=True, ask_when_healthy=True), Advisor(), run_id="r")
    snapshot = TrainingSnapshot(epoch=1, val_loss=[1.0], train_loss=[1.0], layers=[LayerStats(name="fc1.weight", num_params=12)],
                                modes={"neuron_groups": DESCRIBED})
    coordinator.on_epoch_end(snapshot)
    decision = coordinator.on_epoch_end(dataclasses.replace(snapshot, epoch=2))
    assert isinstance(decision, Apply) and decision.alphas == {"fc1.weight#0": 0.1}
    coordinator.report_probation(decision.query_id, ProbationMetrics(val_loss=2.0), ProbationMetrics(val_loss=1.0))
    assert coordinator.alphas.alphas == {"fc1.weight#0": 0.05}  # only the group it touched


def test_the_validator_takes_neuron_groups_only_where_the_run_has_them() -> None:
    snapshot = TrainingSnapshot(layers=[LayerStats(name="fc1.weight", num_params=12), LayerStats(name="fc1.bias", num_params=4)],
                                modes={"neuron_groups": DESCRIBED})
    answer = validate_proposal({"weights": [{"op": "shrink", "group": "fc1.weight#1", "amount": 0.1},
                                            {"op": "shrink", "group": "fc1.weight#5", "amount": 0.1},
                                            {"op": "values", "group": "fc1.bias#0", "values": [0.0, 0.0]}]}, snapshot)
    assert [op.group for op in answer.proposal.weights] == ["fc1.weight#1"]
    assert any("fc1.weight#5" in problem for problem in answer.problems) and any("neuron group" in problem for problem in answer.problems)
    plain = validate_proposal({"weights": [{"op": "shrink", "group": "fc1.weight#1", "amount": 0.1}]},
                              TrainingSnapshot(layers=[LayerStats(name="fc1.weight", num_params=12)]))
    assert plain.proposal is None or not plain.proposal.weights


def test_the_menu_re_draws_only_the_dead_clusters() -> None:
    snapshot = TrainingSnapshot(layers=[LayerStats(name="fc1.weight", num_params=12), LayerStats(name="fc1.bias", num_params=4)],
                                hyperparameters={"lr": 1e-3}, modes={"neuron_groups": DESCRIBED})
    option = next(option for option in build_menu(snapshot, Diagnosis(dead_groups=["fc1.weight"])) if option.action == "reinit_dead")
    assert [op["group"] for op in option.proposal["weights"]] == ["fc1.weight#0", "fc1.bias#0"]
