"""The research modes on a real DeepSpeed engine in one process (`workers.modes`): each changes training
the way it is meant to, and a proposal's training change rolls back exactly."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from orchestration.protocol import Apply, ProbationMetrics, Proposal, TrainingChange, Verdict
from workers.config import ModelConfig, ModesConfig, TrainConfig
from workers.engine import build_engine, full_fp32_params, set_peak_lr
from workers.models import build_model
from workers.modes import TrainingModes, load_pretrained, model_blocks
from workers.probation import ProbationRunner, WeightReferences

pytestmark = pytest.mark.e2e
SHAPE = (1, 8, 8)


def _pretrained_run(tmp_path, *, classes: int = 5, seed: int = 1):
    """A 'finished run' directory whose model.safetensors has a head for `classes` classes."""
    torch.manual_seed(seed)
    source = build_model(ModelConfig(dropout=0.0), SHAPE, classes)
    run = tmp_path / "source"
    run.mkdir(parents=True)
    save_file({name: value.contiguous() for name, value in source.state_dict().items()}, str(run / "model.safetensors"))
    return run, source.state_dict()


def _engine(train: TrainConfig, model_config: ModelConfig, *, classes: int = 10, modes_config: ModesConfig | None = None):
    torch.manual_seed(0)
    model = build_model(model_config, SHAPE, classes)
    modes = TrainingModes.create(modes_config or ModesConfig(), train, model_config, model)
    engine, _ = build_engine(model, train, world_size=1, micro_steps_per_epoch=8, device=torch.device("cpu"), param_groups=modes.optimizer_groups())
    modes.attach(engine)
    return engine, modes


def _steps(engine, count: int, *, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    engine.train()
    for _ in range(count):
        x, y = torch.randn(32, *SHAPE, generator=generator), torch.randint(0, 10, (32,), generator=generator)
        engine.backward(F.cross_entropy(engine(x), y))
        engine.step()


def _split(overrides: dict) -> tuple[dict, dict]:
    """(train.* overrides, modes.* overrides): the research modes' keys live in their own section."""
    mode_keys = {config_field.name for config_field in dataclasses.fields(ModesConfig)}
    return ({key: value for key, value in overrides.items() if key not in mode_keys},
            {key: value for key, value in overrides.items() if key in mode_keys})


def _transfer(tmp_path, stage: int = 0, **overrides):
    run, source = _pretrained_run(tmp_path)
    train_overrides, mode_overrides = _split(overrides)
    train = TrainConfig(**({"zero_stage": stage, "num_workers": 1, "warmup_epochs": 0.0, "lr": 1e-2} | train_overrides))
    engine, modes = _engine(train, ModelConfig(dropout=0.0, pretrained=str(run)), modes_config=ModesConfig(**mode_overrides))
    return engine, modes, source


@pytest.mark.parametrize("stage", [0, 2])
def test_frozen_blocks_keep_the_pretrained_weights_bit_for_bit_while_the_head_trains(single_process_group, tmp_path, stage) -> None:
    engine, modes, source = _transfer(tmp_path, stage)
    assert [block for block, _ in modes.blocks] == ["features.0", "features.2", "classifier.1", "classifier.4"]
    assert modes.frozen == ["features.0", "features.2", "classifier.1"]
    before = full_fp32_params(engine)
    assert torch.equal(before["features.0.weight"], source["features.0.weight"])  # loaded
    assert before["classifier.4.weight"].shape[0] == 10  # the 5-class head was not
    _steps(engine, 5)
    after = full_fp32_params(engine)
    for name in after:
        moved = not torch.equal(after[name], before[name])
        assert moved == name.startswith("classifier.4"), name


def test_unfreezing_thaws_the_block_next_to_the_head_at_its_discriminative_rate(single_process_group, tmp_path) -> None:
    engine, modes, _ = _transfer(tmp_path, layer_lr_decay=0.5)
    assert modes.apply(TrainingChange(unfreeze=1)) == ["unfroze classifier.1"]
    groups = engine.lr_scheduler.optimizer.param_groups
    assert [group["name"] for group in groups] == ["classifier.4", "classifier.1", "features.2", "features.0"]
    assert groups[1]["lr"] == pytest.approx(groups[0]["lr"] * 0.5) and groups[2]["lr"] == 0.0
    before = full_fp32_params(engine)
    _steps(engine, 3)
    after = full_fp32_params(engine)
    assert not torch.equal(after["classifier.1.weight"], before["classifier.1.weight"])
    assert torch.equal(after["features.2.weight"], before["features.2.weight"])
    # A new peak learning rate (a PBT mutation) keeps the ratios and the frozen blocks' zero.
    set_peak_lr(engine, 4e-2)
    assert engine.lr_scheduler.base_lrs == pytest.approx([4e-2, 2e-2, 0.0, 0.0])
    modes.apply(TrainingChange(unfreeze=2))
    assert modes.frozen == [] and min(engine.lr_scheduler.base_lrs) > 0
    with pytest.raises(ValueError, match="no frozen blocks"):
        modes.apply(TrainingChange(unfreeze=1))


def test_scheduled_unfreezing_thaws_one_block_every_n_epochs(single_process_group, tmp_path) -> None:
    _, modes, _ = _transfer(tmp_path, unfreeze_every=2)
    modes.end_epoch(1)
    assert len(modes.frozen) == 3
    modes.end_epoch(2)
    assert modes.frozen == ["features.0", "features.2"]


def test_a_rejected_training_change_rolls_back_exactly(single_process_group, tmp_path) -> None:
    engine, modes, _ = _transfer(tmp_path)
    _steps(engine, 2)
    runner = ProbationRunner(engine=engine, rank=0, batch_size=32, rollback_dir=tmp_path / "rollback", verify_rollback=True, modes=modes)
    decision = Apply(query_id="q1", proposal=Proposal(training=TrainingChange(unfreeze=2)), alphas={}, source="advisor", epoch_asked=1,
                     probation_steps=3, reward_mode="counterfactual", reset_optimizer_moments=False, seed=0)
    frozen_during: list[list[str]] = []

    def probation(steps: int) -> ProbationMetrics:
        frozen_during.append(list(modes.frozen))
        _steps(engine, steps, seed=9)
        return ProbationMetrics(val_loss=1.0)

    before = (list(modes.frozen), list(engine.lr_scheduler.base_lrs))
    result = runner.run(decision, WeightReferences(params=full_fp32_params(engine)), run_probation=probation,
                        epoch_metrics=ProbationMetrics(val_loss=1.0), judge=lambda *_: Verdict(accepted=False, reward=-1.0, reason="worse"))
    assert frozen_during == [before[0], ["features.0"]]  # the reference branch, then the candidate with two blocks thawed
    assert result.rollback_exact is True
    assert (modes.frozen, engine.lr_scheduler.base_lrs) == before
    kept = runner.run(decision, WeightReferences(params=full_fp32_params(engine)), run_probation=probation,
                      epoch_metrics=ProbationMetrics(val_loss=1.0), judge=lambda *_: Verdict(accepted=True, reward=1.0, reason="better"))
    assert kept.accepted and modes.frozen == ["features.0"]


def test_l2sp_holds_the_backbone_near_the_pretrained_weights(single_process_group, tmp_path) -> None:
    def distance(l2sp: float) -> float:
        engine, modes, source = _transfer(tmp_path / str(l2sp), freeze_pretrained=False, l2sp=l2sp, lr=3e-2)
        generator = torch.Generator().manual_seed(3)
        for _ in range(10):
            x, y = torch.randn(32, *SHAPE, generator=generator), torch.randint(0, 10, (32,), generator=generator)
            loss = F.cross_entropy(engine(x), y)
            penalty = modes.penalty()
            engine.backward(loss + penalty if penalty is not None else loss)
            engine.step()
        params = full_fp32_params(engine)
        return math.sqrt(sum(float((params[name] - source[name]).norm() ** 2) for name in modes.pretrained))

    free, pulled = distance(0.0), distance(5.0)
    assert pulled < 0.7 * free, (free, pulled)


def test_pretrained_weights_that_fit_nothing_are_refused(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no model weights"):
        load_pretrained(build_model(ModelConfig(), SHAPE, 10), tmp_path / "missing")
    save_file({"other.weight": torch.zeros(3)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="shares no parameter"):
        load_pretrained(build_model(ModelConfig(), SHAPE, 10), tmp_path)
    with pytest.raises(ValueError, match="model.pretrained"):
        TrainingModes.create(ModesConfig(l2sp=1.0), TrainConfig(), ModelConfig(), build_model(ModelConfig(), SHAPE, 10))


def test_blocks_group_batch_norm_and_activations_with_their_layer() -> None:
    blocks = dict(model_blocks(build_model(ModelConfig(kind="resnet", width=8, depth=1), (1, 8, 8), 3)))
    assert list(blocks) == ["stem.0", "blocks.0", "blocks.1", "head.3"]
    assert "stem.1.weight" in blocks["stem.0"] and "blocks.1.shortcut.0.weight" in blocks["blocks.1"]


# --- curriculum and batch selection ------------------------------------------------------------


def _sampling_modes(**mode_overrides) -> TrainingModes:
    train = TrainConfig(num_workers=1, batch_size=16)
    return TrainingModes.create(ModesConfig(**mode_overrides), train, ModelConfig(), build_model(ModelConfig(), SHAPE, 10))


def test_the_curriculum_trains_on_the_easiest_samples_and_widens_at_its_pace() -> None:
    modes = _sampling_modes(curriculum=True, curriculum_start=0.25, curriculum_pace=0.25)
    scores = np.random.default_rng(0).permutation(400).astype(float)  # sample i's loss; 0-99 are the easiest quarter
    full = modes.epoch_batches(None, num_samples=400, rank=0, world_size=1, epoch=1, seed=0)[0]
    batches, weights = modes.epoch_batches(scores, num_samples=400, rank=0, world_size=1, epoch=1, seed=0)
    seen = np.concatenate(batches)
    assert weights is None and len(batches) == len(full)  # the same budget as a full epoch
    assert scores[seen].max() < 100
    modes.end_epoch(1)
    assert modes.describe()["curriculum_pool"] == 0.5
    modes.apply(TrainingChange(curriculum_pace=0.5))  # the advisor speeds it up
    modes.end_epoch(2)
    assert modes.pool_fraction == 1.0
    assert set(np.concatenate(modes.epoch_batches(scores, num_samples=400, rank=0, world_size=1, epoch=3, seed=0)[0])) == set(range(400))


def test_batch_selection_favours_hard_samples_with_unbiasing_weights() -> None:
    modes = _sampling_modes(batch_selection="advised")
    scores = np.where(np.arange(400) < 40, 5.0, 0.1)  # 40 hard samples
    assert modes.epoch_batches(scores, num_samples=400, rank=0, world_size=1, epoch=1, seed=0)[1] is None  # off until switched on
    assert modes.describe()["batch_selection"] == "off"
    modes.apply(TrainingChange(batch_selection=True))
    batches, weights = modes.epoch_batches(scores, num_samples=400, rank=0, world_size=1, epoch=1, seed=0)
    drawn, weight = np.concatenate(batches), np.concatenate(weights)
    assert (drawn < 40).mean() > 0.3  # 10% of the data, drawn far more often
    assert weight[drawn < 40].max() < 1.0 < weight[drawn >= 40].min()  # hard samples weigh less, so the gradient stays unbiased
    with pytest.raises(ValueError, match="advised"):
        _sampling_modes(batch_selection="on").apply(TrainingChange(batch_selection=False))


# --- adaptive activations ---------------------------------------------------------------------


def test_an_activation_switch_is_part_of_the_modes_state() -> None:
    train = TrainConfig(num_workers=1)
    config = ModelConfig(activation="adaptive", dropout=0.0)
    model = build_model(config, SHAPE, 10)
    modes = TrainingModes.create(ModesConfig(), train, config, model)
    layers = modes.describe()["activations"]
    assert set(layers.values()) == {"relu"}
    first = next(iter(layers))
    saved = {name: value.clone() for name, value in model.state_dict().items()}  # what a rollback loads back
    x = torch.randn(4, *SHAPE)
    relu_out = model(x)
    modes.apply(TrainingChange(activation_layer=first, activation="prelu"))
    assert modes.describe()["activations"][first] == "prelu" and not torch.equal(model(x), relu_out)
    model.load_state_dict(saved)
    assert modes.describe()["activations"][first] == "relu" and torch.equal(model(x), relu_out)
    with pytest.raises(ValueError, match="no adaptive activation"):
        modes.apply(TrainingChange(activation_layer="features.0", activation="prelu"))
    with pytest.raises(ValueError, match="no curriculum"):
        modes.apply(TrainingChange(curriculum_pace=0.3))


def test_without_modes_nothing_changes() -> None:
    modes = _sampling_modes()
    assert modes.describe() == {} and modes.optimizer_groups() is None and not modes.needs_scores and modes.penalty() is None
    from workers.data import shard_batches

    batches, weights = modes.epoch_batches(None, num_samples=100, rank=0, world_size=2, epoch=3, seed=5)
    expected = shard_batches(100, rank=0, world_size=2, batch_size=16, epoch=3, seed=5)
    assert weights is None and all(np.array_equal(a, b) for a, b in zip(batches, expected, strict=True))
    assert dataclasses.asdict(ModesConfig()) == dataclasses.asdict(ModesConfig(curriculum=False, batch_selection="off"))


# --- gradient-free proposals ----------------------------------------------------------------------


def test_gradient_free_proposals_set_the_head_bias_to_values_from_its_history(single_process_group, tmp_path) -> None:
    from orchestration.menu import action_of, build_menu
    from orchestration.protocol import Diagnosis, TrainingSnapshot, WeightOp

    train = TrainConfig(num_workers=1, warmup_epochs=0.0)
    engine, modes = _engine(train, ModelConfig(dropout=0.0), modes_config=ModesConfig(gradient_free=True))
    assert modes.free_group == "classifier.4.bias"
    for epoch, loss in enumerate([0.9, 0.5, 0.7], start=1):  # epoch 2 is the best so far
        _steps(engine, 2, seed=epoch)
        modes.end_epoch(epoch, val_loss=loss)
    described = modes.describe()["free_values"]
    best = modes.free_history[1][1]
    assert described["history"][0] == [0.5, best] and described["current"] == modes.free_history[2][1] != best

    snapshot = TrainingSnapshot(epoch=3, hyperparameters={"lr": 1e-3}, modes=modes.describe())
    options = [option for option in build_menu(snapshot, Diagnosis(plateau=True)) if option.action == "free_values"]
    assert [option.remedy for option in options] == ["plateau", "plateau"]
    chosen = Proposal.from_dict(options[0].proposal)
    assert action_of(chosen) == "free_values" and chosen.weights[0].values == best
    past = options[1].proposal["weights"][0]["values"]  # best + 0.5 * (best - mean of the others)
    others = [modes.free_history[0][1], modes.free_history[2][1]]
    assert past == pytest.approx([b + 0.5 * (b - (x + y) / 2) for b, x, y in zip(best, *others)], abs=1e-4)

    runner = ProbationRunner(engine=engine, rank=0, batch_size=32, rollback_dir=tmp_path / "rollback", modes=modes)
    decision = Apply(query_id="q1", proposal=chosen, alphas={"classifier.4.bias": 1.0}, source="advisor", epoch_asked=3, probation_steps=2,
                     reward_mode="counterfactual", reset_optimizer_moments=False, seed=0)
    runner.run(decision, WeightReferences(params=full_fp32_params(engine)), run_probation=lambda steps: ProbationMetrics(val_loss=1.0),
               epoch_metrics=ProbationMetrics(val_loss=1.0), judge=lambda *_: Verdict(accepted=True, reward=1.0, reason="better"))
    assert full_fp32_params(engine)["classifier.4.bias"].tolist() == pytest.approx(best, abs=1e-6)
    # A frozen block's weights are not the advisor's to set either (transfer learning).
    with pytest.raises(ValueError, match="frozen"):
        _transfer(tmp_path / "t")[1].check_weight_ops([WeightOp(op="values", group="features.0.bias", values=[0.0] * 32)])
