"""Does LLM-advised training beat its peers? Real hybridtrain runs at equal budget, per task and starting condition.

    python benchmarks/compare.py                               # 3 tasks x 2 conditions x 3 seeds, static / heuristic / llm
    python benchmarks/compare.py --methods static llm llm-no-gate llm-alpha1 llm-no-cache llm-no-record   # ablations
    python benchmarks/compare.py --smoke                       # digits, hard start, 1 seed, static and heuristic, 3 epochs (CI)
    python benchmarks/compare.py --out DIR                     # continue: runs already in DIR are read, not run again

Every method trains the same model for the same number of epochs (per task: digits 12, tabular 30, shapes
12; `--epochs` sets all), early stopping off: the budget is equal. Runs are real: Ray Train workers with
DeepSpeed ZeRO-2 on the embedded local Ray, the advisor on Ray Serve for LLM methods. Tasks (`benchmarks/tasks.py`): the CNN on digits, an MLP on the
breast-cancer CSV, the CNN on generated noisy shapes. Conditions: `good` (the defaults) and `hard` (the
learning rate 30x too low), where advice has room to help, and `collapsed` (100x too high: at chance within two
epochs, which only the advisor's restart undoes).

Methods: `static` (no advisor), `heuristic` (rules choose from the menu), `llm` (the bundled SmolLM2
chooses: the default advisor, which waits up to 30 s for the answer to a query a finding triggered), and
ablations of the LLM advisor: `llm-no-wait` (never waits: the answer is used at whichever epoch boundary it
arrives by, or dropped as stale), `llm-ask-healthy` (the model is asked even when no finding calls for a
change), `llm-no-gate` (every proposal kept),
`llm-alpha1` (weights replaced, not blended: alpha 1), `llm-no-cache`, `llm-no-record` (no track
record in the prompt or the menu's prior), `llm-invent` (it writes whole proposals, the old design).
Research modes: `curriculum`, `selection` (batch selection the advisor switches), `selection-on`, `activation`
(adaptive activations the advisor switches), `prelu`, `rational`, `transfer` (from a run of the other image
task, head first, the advisor unfreezes), `transfer-schedule` (one block thawed every 2 epochs) and
`gradient-free` (the advisor may set the last layer's bias to values from its history) and `neuron-groups`
(one alpha per k-means group of a layer's neurons; dead clusters re-drawn on their own).
Peers (issue 24): `prodigy`, `schedulefree` (schedule-free AdamW) and `lr-find` (`train.lr: find`), each alone and with
`-heuristic` or `-llm` on top; Prodigy and the LR range test choose their own rate whatever the condition.

Printed per task, condition and method: test accuracy (mean and std over seeds), epochs to the task's
target validation accuracy (median, and how many runs reached it), training wall time, proposals
accepted/rejected (sums). Each run's figures go to `DIR/results.jsonl` as it ends. The table starts with
scikit-learn anchors fitted on the same splits (one per seed). Writes `DIR/table.md` and `DIR/accuracy.svg`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.tasks import TASKS, anchors, task_overrides  # noqa: E402

METHODS = {
    "static": ["advisor.backend=none"],
    "heuristic": ["advisor.backend=heuristic"],
    "llm": ["advisor.backend=smollm2"],
    "llm-no-wait": ["advisor.backend=smollm2", "coordinator.wait_on_findings_s=0"],
    "llm-ask-healthy": ["advisor.backend=smollm2", "coordinator.ask_when_healthy=true"],
    "llm-no-gate": ["advisor.backend=smollm2", "coordinator.accept_threshold=-1000000", "coordinator.accept_significance=0"],
    "llm-alpha1": ["advisor.backend=smollm2", "coordinator.stability_alpha=1.0", "coordinator.alpha_max=1.0"],
    "llm-no-cache": ["advisor.backend=smollm2", "coordinator.cache_enabled=false"],
    "llm-no-record": ["advisor.backend=smollm2", "coordinator.track_record=false", "coordinator.max_recent_proposals=0"],
    "llm-invent": ["advisor.backend=smollm2", "coordinator.advice_mode=invent"],
    # Research modes (`workers.modes`), each with the heuristic advisor where the advisor may steer it, or alone.
    "curriculum": ["advisor.backend=heuristic", "modes.curriculum=true"],
    "selection": ["advisor.backend=heuristic", "modes.batch_selection=advised"],
    "selection-on": ["advisor.backend=none", "modes.batch_selection=on"],
    "activation": ["advisor.backend=heuristic", "model.activation=adaptive"],
    "prelu": ["advisor.backend=none", "model.activation=prelu"],
    "rational": ["advisor.backend=none", "model.activation=rational"],
    "transfer": ["advisor.backend=heuristic", "model.pretrained={source}"],
    "transfer-schedule": ["advisor.backend=none", "model.pretrained={source}", "modes.unfreeze_every=2"],
    "gradient-free": ["advisor.backend=heuristic", "modes.gradient_free=true"],
    "neuron-groups": ["advisor.backend=heuristic", "coordinator.neuron_groups=true"],
    # The peers a user who does not know the learning rate has (issue 24), alone and with an advisor on top. Prodigy and
    # the LR range test pick their own rate, so a condition's learning rate does not reach them (their overrides come
    # after it); schedule-free AdamW still takes one.
    "prodigy": ["advisor.backend=none", "train.optimizer=prodigy", "train.lr=1.0"],
    "prodigy-heuristic": ["advisor.backend=heuristic", "train.optimizer=prodigy", "train.lr=1.0"],
    "prodigy-llm": ["advisor.backend=smollm2", "train.optimizer=prodigy", "train.lr=1.0"],
    "schedulefree": ["advisor.backend=none", "train.optimizer=schedulefree_adamw"],
    "schedulefree-heuristic": ["advisor.backend=heuristic", "train.optimizer=schedulefree_adamw"],
    "schedulefree-llm": ["advisor.backend=smollm2", "train.optimizer=schedulefree_adamw"],
    "lr-find": ["advisor.backend=none", "train.lr=find"],
    "lr-find-heuristic": ["advisor.backend=heuristic", "train.lr=find"],
    "lr-find-llm": ["advisor.backend=smollm2", "train.lr=find"],
}
# Transfer learning starts from a run of the other image task (the CNN's conv layers fit both; the head is
# fresh). The tabular task has no related source: its transfer rows are skipped.
SOURCE_TASKS = {"digits": "shapes", "shapes": "digits"}
BASE_LR = 3e-3  # train.lr's default
# The hard start: a learning rate 30x too low on every task. Not 10x too high: digits recovers from that by
# itself (static 0.978 at lr 0.03, 12 epochs), and from about 25x too high the net is dead after the first
# epoch, before any advice can act (val accuracy 0.10 at lr 0.08 and up).
HARD = {task: [f"train.lr={BASE_LR / 30:g}"] for task in ("digits", "tabular", "shapes")}
# The collapsed start: 100x too high. The net is at chance after two epochs; the advisor's restart (issue 24) is its remedy.
COLLAPSED = {task: [f"train.lr={BASE_LR * 100:g}"] for task in ("digits", "tabular", "shapes")}
CONDITIONS = {"good": {}, "hard": HARD, "collapsed": COLLAPSED}
EPOCHS = {"digits": 12, "tabular": 30, "shapes": 12}  # per task, the same for every method; tabular runs take seconds
TARGETS = {"digits": 0.97, "tabular": 0.95, "shapes": 0.5}  # validation accuracy


def epochs_to_target(run_dir: Path, target: float) -> int | None:
    import pandas as pd

    metrics = pd.read_csv(run_dir / "metrics.csv")
    reached = metrics[metrics.val_accuracy >= target]
    return int(reached.epoch.iloc[0]) if len(reached) else None


def _mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{values[0]:.4f}"


def table(records: list[dict], anchor_rows: dict[str, dict[str, list[float]]]) -> str:
    lines = ["| task | condition | method | seeds | test acc (mean ± std) | epochs to target (reached) | train wall s | accepted / rejected |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for task, values in anchor_rows.items():
        for name, accuracies in values.items():
            lines.append(f"| {task} | anchor | {name} (scikit-learn, same splits) | {len(accuracies)} | {_mean_std(accuracies)} | | | |")
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for record in records:
        groups.setdefault((record["task"], record["condition"], record["method"]), []).append(record)
    for (task, condition, method), runs in sorted(groups.items()):
        reached = [run["to_target"] for run in runs if run["to_target"] is not None]
        to_target = f"{statistics.median(reached):.0f} ({len(reached)}/{len(runs)})" if reached else f"never (0/{len(runs)})"
        lines.append(f"| {task} | {condition} | {method} | {len(runs)} | {_mean_std([run['test'] for run in runs])} | {to_target} "
                     f"| {statistics.median(run['wall_s'] for run in runs):.1f} | {sum(run['accepted'] for run in runs)} / "
                     f"{sum(run['rejected'] for run in runs)} |")
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> None:
    """Mean test accuracy per method, one group of bars per task and condition, as a dependency-free SVG."""
    groups = sorted({(r["task"], r["condition"]) for r in records})
    methods = list(dict.fromkeys(r["method"] for r in records))
    colours = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]
    bar, gap, height = 14, 24, 220
    width = 60 + len(groups) * (len(methods) * bar + gap)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 90}" font-family="sans-serif" font-size="10">',
             f'<text x="10" y="14">mean test accuracy per method (0 to 1)</text>']
    for index, (task, condition) in enumerate(groups):
        x0 = 50 + index * (len(methods) * bar + gap)
        for m, method in enumerate(methods):
            values = [r["test"] for r in records if (r["task"], r["condition"], r["method"]) == (task, condition, method)]
            if values:
                h = statistics.mean(values) * height
                parts.append(f'<rect x="{x0 + m * bar}" y="{20 + height - h:.1f}" width="{bar - 2}" height="{h:.1f}" fill="{colours[m % 8]}">'
                             f'<title>{task} {condition} {method}: {statistics.mean(values):.4f}</title></rect>')
        parts.append(f'<text x="{x0}" y="{height + 34}">{task}/{condition}</text>')
    for m, method in enumerate(methods):
        parts.append(f'<rect x="{50 + m * 90}" y="{height + 50}" width="10" height="10" fill="{colours[m % 8]}"/>'
                     f'<text x="{64 + m * 90}" y="{height + 59}">{method}</text>')
    path.write_text("\n".join(parts + ["</svg>"]))


def _transfer_source(task: str, seed: int, out: Path) -> Path:
    """A finished static run of `task` (good defaults) to start transfer runs from; made once per seed."""
    from cluster.experiment import build_config
    from cluster.launch import execute_run, plan_run
    from cluster.runtime import connect

    run_dir = out / "sources" / f"{task}-{seed}"
    if not (run_dir / "model.safetensors").is_file():
        if run_dir.exists():
            shutil.rmtree(run_dir)
        config = build_config(overrides=[*task_overrides(task, out / "data"), "advisor.backend=none", f"train.epochs={EPOCHS[task]}",
                                         f"train.seed={seed}", f"data.seed={seed}"])
        summary = execute_run(plan_run(config, run_dir), cluster=connect(config.cluster, quiet=True))
        print(f"[compare] transfer source {task} seed {seed}: test accuracy {summary['test_accuracy']:.4f}", flush=True)
    return run_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--conditions", nargs="+", default=["hard", "good"], choices=list(CONDITIONS))
    parser.add_argument("--methods", nargs="+", default=["static", "heuristic", "llm"], choices=list(METHODS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help=f"epochs of every run (default per task: {EPOCHS})")
    parser.add_argument("--smoke", action="store_true", help="digits, hard start, 1 seed, static and heuristic, 3 epochs")
    parser.add_argument("--out", type=Path, default=None, help="benchmark directory (default: a new temporary one)")
    args = parser.parse_args()
    if args.smoke:
        args.tasks, args.conditions, args.seeds, args.epochs, args.methods = ["digits"], ["hard"], 1, 3, ["static", "heuristic"]
    out = args.out or Path(tempfile.mkdtemp(prefix="hybridtrain-compare-"))
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.jsonl"
    records = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.is_file() else []
    done = {(r["task"], r["condition"], r["method"], r["seed"]) for r in records}

    import ray

    from cluster.experiment import build_config
    from cluster.launch import execute_run, plan_run
    from cluster.runtime import connect

    # every seed splits the data its own way (data.seed): the anchors are fitted on each of those splits
    per_seed = {task: [anchors(task, out / "data", seed=seed) for seed in range(args.seeds)] for task in args.tasks}
    anchor_rows = {task: {name: [fits[name] for fits in runs] for name in runs[0]} for task, runs in per_seed.items()}
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    started_all = time.perf_counter()
    # Condition by condition (the first one named, in every seed, before the next), so an interrupted
    # benchmark has whole seeds of one condition rather than one seed of everything.
    for condition in args.conditions:
        for seed in range(args.seeds):
            for task in args.tasks:
                for method in args.methods:
                    if (task, condition, method, seed) in done:
                        continue
                    source = ""
                    if "{source}" in " ".join(METHODS[method]):
                        if task not in SOURCE_TASKS:
                            continue
                        source = str(_transfer_source(SOURCE_TASKS[task], seed, out))
                    run_dir = out / f"{task}-{condition}-{method}-{seed}"
                    if run_dir.exists():  # an interrupted run of an earlier invocation: its result was never recorded
                        shutil.rmtree(run_dir)
                    sets = [*task_overrides(task, out / "data"), *CONDITIONS[condition].get(task, []),
                            *(item.format(source=source) for item in METHODS[method]),  # after the condition: a method's own lr wins
                            f"train.epochs={args.epochs or EPOCHS[task]}", "train.early_stopping_patience=0", f"train.seed={seed}", f"data.seed={seed}",
                            "advisor.num_cpus_per_replica=1"]
                    config = build_config(overrides=sets)
                    started = time.perf_counter()
                    summary = execute_run(plan_run(config, run_dir), cluster=connect(config.cluster, quiet=True))
                    record = {"task": task, "condition": condition, "method": method, "seed": seed, "test": summary["test_accuracy"],
                              "to_target": epochs_to_target(run_dir, TARGETS[task]), "wall_s": summary["wall_s"],
                              "driver_wall_s": time.perf_counter() - started, "accepted": summary.get("proposals_accepted", 0) or 0,
                              "rejected": summary.get("proposals_rejected", 0) or 0, "queries": summary.get("advisor_queries", 0) or 0}
                    records.append(record)
                    with open(results_file, "a") as log:
                        log.write(json.dumps(record) + "\n")
                    print(f"[compare] {json.dumps(record)}  ({time.perf_counter() - started_all:.0f}s so far)", flush=True)
    text = table(records, anchor_rows)
    (out / "table.md").write_text(text + "\n")
    plot(records, out / "accuracy.svg")
    print(f"\n{args.epochs or EPOCHS} epochs per run, early stopping off; targets (val acc) {TARGETS}; results in {out}\n{text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
