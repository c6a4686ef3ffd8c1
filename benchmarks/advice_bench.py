"""Advice bench: does an advisor point the right way on training states whose right direction is known?

    python benchmarks/advice_bench.py                    # 3 tasks x 5 conditions x 3 epochs = 45 states, every advisor
    python benchmarks/advice_bench.py --smoke            # 1 task, every condition, 1 state each, no LLM: seconds (CI)
    python benchmarks/advice_bench.py --advisors heuristic llm-choose random

States come from real short runs, not typed numbers: the project's own models train in this process
(plain PyTorch, AdamW, one worker) on each task (`benchmarks/tasks.py`) under one deliberately broken
setting, and the state is taken at a few epochs of each run:

| condition | broken setting | right direction |
|---|---|---|
| healthy | good defaults | keep |
| lr_high | learning rate 30x too high | lower lr (lr_down or rescue) |
| lr_low | learning rate 100x too low | raise lr |
| overfit | 60 training samples, no dropout or weight decay | regularise |
| dead | hidden biases set to -4 at the start (most ReLUs dead) | re-draw dead units |

Each state's snapshot is built by the workers' own observer and read by the coordinator's own diagnosis and
menu, then each advisor answers it. Per advisor: right-direction rate (its proposal's action family is the
right one), harm rate (applied to the real state and trained `--probation-steps` steps, the proposal's
reward against the untouched counterfactual, on the same batches, is below -1e-6), no-op rate on healthy
states, and median latency. Advisors: `heuristic` (rules pick from the menu), `llm-choose` (the bundled
SmolLM2 scores the menu, times the coordinator's prior: the default), `llm-only` (the same model's scores
alone, no prior: what the model itself knows), `llm-invent` (it writes a whole proposal, the old design),
`random` (a random option from the menu).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.tasks import TASKS, task_overrides  # noqa: E402
from orchestration.acceptance import compute_reward  # noqa: E402
from orchestration.alphas import AlphaController  # noqa: E402
from orchestration.config import CoordinatorConfig  # noqa: E402
from orchestration.diagnostics import DiagnosticThresholds, diagnose  # noqa: E402
from orchestration.menu import action_of, build_menu  # noqa: E402
from orchestration.protocol import ProbationMetrics, Proposal, TrainingSnapshot  # noqa: E402

CONDITIONS = {
    "healthy": ({"keep"}, {}),
    "lr_high": ({"lr_down", "rescue"}, {"lr_factor": 30.0}),
    "lr_low": ({"lr_up"}, {"lr_factor": 0.01}),
    "overfit": ({"regularise"}, {"train_samples": 60, "dropout": 0.0, "weight_decay": 0.0}),
    "dead": ({"reinit_dead"}, {"dead_bias": -4.0}),
}
ADVISORS = ("heuristic", "llm-choose", "llm-only", "llm-invent", "random")
GOOD_LR = {"digits": 2e-3, "tabular": 2e-3, "shapes": 2e-3}
BATCH = 64


@dataclasses.dataclass
class State:
    task: str
    condition: str
    epoch: int
    snapshot: TrainingSnapshot
    model: torch.nn.Module
    optimizer_state: dict
    hyperparameters: dict[str, float]
    best: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    dead_units: dict[str, torch.Tensor]
    data: tuple  # (x_train, y_train, x_val, y_val)


class _Engine:
    """What the workers' observer reads from a DeepSpeed engine: just the module."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module


def _data(task: str, folder: Path, train_samples: int | None, seed: int):
    from workers.config import DataConfig
    from workers.data import Normalizer, load_dataset, stratified_split

    overrides = dict(item.split("=", 1) for item in task_overrides(task, folder))
    dataset = load_dataset(DataConfig(path=overrides.get("data.path"), seed=seed))
    split = stratified_split(dataset.y, val_fraction=0.1, test_fraction=0.1, seed=seed)
    train = split.train if train_samples is None else np.random.default_rng(seed).permutation(split.train)[:train_samples]
    normalize = Normalizer.fit(dataset.x[train])
    tensor = lambda index: (torch.from_numpy(normalize(dataset.x[index])), torch.from_numpy(dataset.y[index]))  # noqa: E731
    return (*tensor(train), *tensor(split.val)), dataset, overrides.get("model.kind", "cnn2d")


def _evaluate(model, x, y) -> tuple[float, float, np.ndarray, np.ndarray]:
    model.eval()
    with torch.no_grad():
        logits = model(x)
        losses = F.cross_entropy(logits, y, reduction="none")
    correct = (logits.argmax(1) == y).long()
    return float(losses.mean()), float(correct.float().mean()), losses.numpy(), correct.numpy()


def _train_steps(model, optimizer, x, y, steps: int, generator: torch.Generator) -> float:
    model.train()
    total = 0.0
    for _ in range(steps):
        index = torch.randint(len(x), (min(BATCH, len(x)),), generator=generator)
        loss = F.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += float(loss)
    return total / max(steps, 1)


def collect_states(tasks, conditions, epochs_at, folder: Path, seed: int = 0) -> list[State]:
    """Train each (task, condition) run and keep its state at each epoch in `epochs_at`."""
    from workers.config import ModelConfig
    from workers.models import build_model, set_dropout
    from workers.observer import AdviceObserver

    states = []
    for task in tasks:
        for condition in conditions:
            _, setting = CONDITIONS[condition]
            (xt, yt, xv, yv), dataset, kind = _data(task, folder, setting.get("train_samples"), seed)
            torch.manual_seed(seed)
            dropout = setting.get("dropout", 0.1)
            model = build_model(ModelConfig(kind=kind, dropout=dropout), dataset.sample_shape, len(dataset.classes))
            if "dead_bias" in setting:
                linears = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))][:-1]
                with torch.no_grad():
                    for module in linears:
                        module.bias.fill_(setting["dead_bias"])
            lr = GOOD_LR[task] * setting.get("lr_factor", 1.0)
            decay = setting.get("weight_decay", 1e-4)
            optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=decay)
            observer = AdviceObserver(engine=_Engine(model), world_size=1)
            generator = torch.Generator().manual_seed(seed)
            steps = max(len(xt) // BATCH, 1) if setting.get("train_samples") is None else 8
            history, best, best_loss = [], None, float("inf")
            for epoch in range(max(epochs_at) + 1):
                model.train()
                train_loss = _train_steps(model, optimizer, xt, yt, steps - 1, generator)
                with observer.watch_grad_norms():  # the epoch's last step, as the workers do
                    train_loss = (train_loss * (steps - 1) + _train_steps(model, optimizer, xt, yt, 1, generator)) / steps
                with observer.watch_dead_units():
                    val_loss, val_accuracy, _, _ = _evaluate(model, xv, yv)
                params = {name: p.detach().clone() for name, p in model.named_parameters()}
                observer.update_ema(params)
                if val_loss < best_loss:
                    best, best_loss = params, val_loss
                history.append({"train_loss": train_loss, "val_loss": val_loss, "val_accuracy": val_accuracy})
                hyper = {"lr": lr, "weight_decay": decay, "dropout": dropout, "momentum": 0.9, "batch_size": BATCH}
                snapshot = observer.snapshot(run_id=f"{task}-{condition}", model_kind=kind, total_epochs=30, epoch=epoch + 1, step=(epoch + 1) * steps,
                                             history=history, params=params, hyperparameters=hyper, history_window=8)
                observer.last_params = params
                if epoch in epochs_at:
                    states.append(State(task=task, condition=condition, epoch=epoch + 1, snapshot=snapshot, model=copy.deepcopy(model),
                                        optimizer_state=copy.deepcopy(optimizer.state_dict()), hyperparameters=dict(hyper), best=best,
                                        ema=dict(observer.ema_params), dead_units=dict(observer.dead_units), data=(xt, yt, xv, yv)))
            print(f"[advice-bench] {task}/{condition}: val loss {history[-1]['val_loss']:.3f}, val acc {history[-1]['val_accuracy']:.3f}", flush=True)
    return states


def probation_reward(state: State, proposal: Proposal, *, steps: int, config: CoordinatorConfig) -> float:
    """The proposal's reward on the real state: candidate vs counterfactual, same batches, as the workers judge."""
    from workers.blending import apply_hyperparameter_change, apply_weight_ops
    from workers.models import set_dropout

    xt, yt, xv, yv = state.data

    def branch(apply: bool) -> ProbationMetrics:
        model = copy.deepcopy(state.model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=state.hyperparameters["lr"], weight_decay=state.hyperparameters["weight_decay"])
        optimizer.load_state_dict(state.optimizer_state)
        if apply:
            values, _ = apply_hyperparameter_change(state.hyperparameters, proposal.hyperparameters)
            for group in optimizer.param_groups:
                group["lr"], group["weight_decay"] = values["lr"], values["weight_decay"]
            set_dropout(model, values["dropout"])
            alphas = AlphaController.from_config(config).for_proposal(proposal)
            params = {name: p.detach().clone() for name, p in model.named_parameters()}
            updated, _ = apply_weight_ops(params, proposal.weights, alphas, best=state.best, ema=state.ema, dead_units=state.dead_units, seed=0)
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    if name in updated:
                        parameter.copy_(updated[name])
        train_loss = _train_steps(model, optimizer, xt, yt, steps, torch.Generator().manual_seed(1))
        val_loss, accuracy, losses, correct = _evaluate(model, xv, yv)
        return ProbationMetrics(val_loss=val_loss, val_accuracy=accuracy, train_loss=train_loss,
                                sample_losses=tuple(losses.tolist()), sample_correct=tuple(correct.tolist()))

    return compute_reward(branch(True), branch(False), config)


def ask(advisor: str, snapshots: list[TrainingSnapshot], backend) -> list[tuple[Proposal | None, float]]:
    """Each snapshot's answer from `advisor`, with its latency in seconds."""
    from serve_llm.validate import validate_choice

    answers = []
    for snapshot in snapshots:
        started = time.perf_counter()
        if advisor == "random":
            response = validate_choice(random.Random(snapshot.run_id + str(snapshot.epoch)).choice(snapshot.menu).key, snapshot)
        elif advisor == "llm-only":
            flat = dataclasses.replace(snapshot, menu=[dataclasses.replace(option, prior=1.0) for option in snapshot.menu])
            response = backend.propose_batch([flat])[0]
        elif advisor == "llm-invent":
            response = backend.propose_batch([dataclasses.replace(snapshot, menu=[])])[0]
        else:
            response = backend.propose_batch([snapshot])[0]
        answers.append((response.proposal if response.usable else None, time.perf_counter() - started))
    return answers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--advisors", nargs="+", default=list(ADVISORS), choices=ADVISORS)
    parser.add_argument("--epochs-at", nargs="+", type=int, default=[3, 5, 7], help="0-based epochs at which states are taken")
    parser.add_argument("--probation-steps", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="digits, one state per condition, no LLM")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.smoke:
        args.tasks, args.epochs_at = ["digits"], [3]
        args.advisors = [advisor for advisor in args.advisors if not advisor.startswith("llm")]
    out = args.out or Path(tempfile.mkdtemp(prefix="hybridtrain-advice-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    config = CoordinatorConfig()
    thresholds = DiagnosticThresholds.from_config(config)
    started = time.perf_counter()
    states = collect_states(args.tasks, list(CONDITIONS), args.epochs_at, out / "data")
    for state in states:
        diagnosis = diagnose(state.snapshot, thresholds)
        state.snapshot = dataclasses.replace(state.snapshot, diagnosis=diagnosis, menu=build_menu(state.snapshot, diagnosis))
    print(f"[advice-bench] {len(states)} states in {time.perf_counter() - started:.0f}s", flush=True)

    backend = None
    if any(advisor.startswith("llm") for advisor in args.advisors):
        from serve_llm.backends import TransformersBackend
        from serve_llm.config import AdvisorConfig

        backend = TransformersBackend(AdvisorConfig(num_cpus_per_replica=2))
    from serve_llm.backends import HeuristicBackend

    rows = []
    for advisor in args.advisors:
        answers = ask(advisor, [state.snapshot for state in states], HeuristicBackend() if advisor == "heuristic" else backend)
        for state, (proposal, latency) in zip(states, answers):
            right, _ = CONDITIONS[state.condition]
            action = action_of(proposal) if proposal is not None else "invalid"
            reward = probation_reward(state, proposal, steps=args.probation_steps, config=config) if proposal is not None and action != "keep" else 0.0
            rows.append({"advisor": advisor, "task": state.task, "condition": state.condition, "epoch": state.epoch, "action": action,
                         "right": action in right, "harm": bool(reward < -1e-6), "reward": reward, "latency_s": latency,
                         "findings": "; ".join(state.snapshot.diagnosis.notes)})
        print(f"[advice-bench] {advisor} done ({time.perf_counter() - started:.0f}s)", flush=True)
    (out / "rows.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    lines = ["| advisor | states | right direction | harm | no-op on healthy | median latency s |", "|---|---:|---:|---:|---:|---:|"]
    for advisor in args.advisors:
        mine = [row for row in rows if row["advisor"] == advisor]
        healthy = [row for row in mine if row["condition"] == "healthy"]
        lines.append(f"| {advisor} | {len(mine)} | {sum(r['right'] for r in mine) / len(mine):.0%} | {sum(r['harm'] for r in mine) / len(mine):.0%} "
                     f"| {sum(r['action'] == 'keep' for r in healthy) / max(len(healthy), 1):.0%} | {statistics.median(r['latency_s'] for r in mine):.2f} |")
    by_condition = ["", "| advisor | " + " | ".join(CONDITIONS) + " |", "|---|" + "---:|" * len(CONDITIONS)]
    for advisor in args.advisors:
        cells = []
        for condition in CONDITIONS:
            mine = [row for row in rows if row["advisor"] == advisor and row["condition"] == condition]
            cells.append(f"{sum(r['right'] for r in mine)}/{len(mine)}")
        by_condition.append(f"| {advisor} | " + " | ".join(cells) + " |")
    table = "\n".join(lines + by_condition)
    (out / "table.md").write_text(table + "\n")
    print(f"\n{len(states)} states ({', '.join(args.tasks)}; conditions {', '.join(CONDITIONS)}; epochs {args.epochs_at}); right direction per "
          f"condition below; rows in {out / 'rows.jsonl'}\n{table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
