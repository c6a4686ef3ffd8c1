"""The research modes end to end: real Ray Train + DeepSpeed workers, the coordinator actor and a scripted
advisor whose proposals are training changes. Each goes through the same probation, verdict and ledger as
any other advice, and the run keeps what the modes promise (frozen blocks bit for bit as pretrained)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from safetensors.torch import load_file

from cluster.audit import audit_run
from cluster.experiment import build_config
from cluster.launch import run_experiment

pytestmark = pytest.mark.e2e

CHANGES = [
    {"training": {"unfreeze": 1}, "reason": "unfreeze the next block"},
    {"training": {"activation_layer": "features.1", "activation": "prelu"}, "reason": "leaky units"},
    {"training": {"batch_selection": True}, "reason": "focus on hard samples"},
    {"training": {"curriculum_pace": 0.5}, "reason": "widen the curriculum"},
]


def test_training_changes_go_through_probation_and_the_ledger(ray_local, tmp_path) -> None:
    source = tmp_path / "source"
    run_experiment(build_config(recipe="smoke", overrides=["train.num_workers=1", "train.epochs=3", "advisor.backend=none"]), source)
    script = tmp_path / "script.json"
    script.write_text(json.dumps(CHANGES))
    run_dir = tmp_path / "modes"
    overrides = ["train.num_workers=2", "train.epochs=9", "train.early_stopping_patience=0", "train.checkpoint_every=1",
                 f"model.pretrained={source}", "model.activation=adaptive", "modes.curriculum=true", "modes.batch_selection=advised",
                 "advisor.backend=scripted", f"advisor.script={script}", "coordinator.query_interval=1", "coordinator.burn_in_epochs=1", "coordinator.ask_when_healthy=true",
                 "coordinator.probation_steps=3", "coordinator.cache_enabled=false", "coordinator.verify_rollback=true"]
    summary = run_experiment(build_config(recipe="smoke", overrides=overrides), run_dir)

    ledger = pd.read_csv(run_dir / "interventions.csv")
    verdicts = ledger[ledger.kind == "verdict"]
    tried = " ".join(verdicts.proposal_summary.astype(str))
    assert len(verdicts) >= 4 and all(word in tried for word in ("unfreeze=1", "activation(features.1,prelu)", "batch_selection=on", "curriculum_pace=0.5"))
    assert set(verdicts.verdict) <= {"accepted", "rejected"}  # each applied and judged, none failed to apply
    assert summary["rollbacks_verified"] == summary["proposals_rejected"]  # every rejected change rolled back bit for bit
    assert audit_run(run_dir) == []

    progress = (run_dir / "progress.log").read_text()
    assert "transfer:" in progress and "3 of 4 blocks frozen" in progress
    # Blocks still frozen at the end hold the source run's weights exactly; the head does not.
    last = max(run_dir.rglob("loop_state.json"), key=lambda path: json.loads(path.read_text())["epoch"])
    frozen = json.loads(last.read_text())["modes"]["frozen"]
    mine, theirs = load_file(str(run_dir / "model.safetensors")), load_file(str(source / "model.safetensors"))
    assert "features.0" in frozen
    for name in mine:
        if any(name.startswith(block + ".") for block in frozen) and name.endswith(("weight", "bias")) and "act" not in name:
            assert (mine[name] == theirs[name]).all(), name
    assert not (mine["classifier.4.weight"] == theirs["classifier.4.weight"]).all()


def test_neuron_group_coupling_blends_and_judges_per_group(ray_local, tmp_path) -> None:
    script = tmp_path / "script.json"
    script.write_text(json.dumps([{"weights": [{"op": "shrink", "group": "features.0.weight#0", "amount": 0.3}], "reason": "one group"},
                                  {"weights": [{"op": "noise", "group": "classifier.1.weight", "amount": 0.2}], "reason": "a whole layer"}]))
    run_dir = tmp_path / "groups"
    overrides = ["train.num_workers=2", "train.epochs=5", "train.early_stopping_patience=0", "coordinator.neuron_groups=true",
                 "advisor.backend=scripted", f"advisor.script={script}", "coordinator.query_interval=1", "coordinator.burn_in_epochs=1", "coordinator.ask_when_healthy=true",
                 "coordinator.probation_steps=3", "coordinator.cache_enabled=false", "coordinator.verify_rollback=true"]
    summary = run_experiment(build_config(recipe="smoke", overrides=overrides), run_dir)
    ledger = pd.read_csv(run_dir / "interventions.csv")
    proposals = ledger[ledger.kind == "proposal"]
    alphas = [json.loads(text) for text in proposals.alphas_json]
    assert alphas[0] == {"features.0.weight#0": 0.1}  # a proposal on one neuron group: that group's alpha only
    assert sorted(alphas[1]) == [f"classifier.1.weight#{group}" for group in range(7)]  # 128 units: log2 -> 7 groups, one alpha each
    assert set(ledger[ledger.kind == "verdict"].verdict) <= {"accepted", "rejected"}
    assert summary["rollbacks_verified"] == summary["proposals_rejected"]
    assert audit_run(run_dir) == []
