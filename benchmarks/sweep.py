"""Compare sweep methods at the same budget: PBT with and without LLM-guided explore, PB2, ASHA, random search.

    python benchmarks/sweep.py                          # digits and a generated harder task, 3 seeds, every method
    python benchmarks/sweep.py --tasks digits --seeds 1 --methods pbt asha random   # a quicker look
    python benchmarks/sweep.py --out DIR                # continue: sweeps already in DIR are read, not run again

Every method gets the same population (`--trials`) and epochs per trial (`--epochs`), so the same budget of
trial-epochs at most (ASHA stops some trials early and spends less; the table says how much). Printed per
task and method, as the median over seeds: the best trial's validation accuracy, its test accuracy,
trial-epochs until some trial first reached the task's target validation accuracy, trial-epochs spent, wall
time. Sweeps run seed by seed (every task and method for seed 0 first), and each one's figures go to
`DIR/results.jsonl` as it ends, so an interrupted benchmark keeps what it measured.

The harder task is made here, offline: scikit-learn's `make_classification` (64 features, 10 classes, 12
informative dimensions, 5 % label noise), written to an `.npz`, trained with the MLP.

Trials are the smoke run's (ZeRO-2, digits CNN or the MLP), `--workers` Ray Train workers each; "pbt+llm" asks
the bundled SmolLM2 on Ray Serve for every explore (within-run advice is off in every method, so the methods
differ only in how they search).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = {
    "pbt": ["tune.scheduler=pbt"],
    "pbt+llm": ["tune.scheduler=pbt", "tune.llm_explore=true", "advisor.backend=smollm2", "coordinator.burn_in_epochs=1000"],
    "pb2": ["tune.scheduler=pb2"],
    "asha": ["tune.scheduler=asha"],
    "random": ["tune.scheduler=random"],
}
TARGETS = {"digits": 0.98, "hard": 0.35}  # validation accuracy to reach (a good digits trial has 0.95 after one epoch; on the
# hard task logistic regression reaches 0.26 test accuracy and histogram gradient boosting 0.42 on the same split)


def make_hard_task(path: Path, seed: int = 0) -> Path:
    import numpy as np
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=3000, n_features=64, n_informative=12, n_redundant=8, n_classes=10, n_clusters_per_class=2,
                               flip_y=0.05, class_sep=0.8, random_state=seed)
    np.savez(path, x=x.astype("float32"), y=y.astype("int64"))
    return path


def trial_epochs_to_target(sweep_dir: Path, target: float) -> tuple[int | None, int]:
    """(trial-epochs spent when some trial first reported val_accuracy >= target, trial-epochs spent in all)."""
    import pandas as pd

    rows = []
    for path in sweep_dir.glob("ray/tune/*/progress.csv"):
        frame = pd.read_csv(path)
        if "val_accuracy" in frame and "timestamp" in frame:
            rows += list(zip(frame.timestamp, frame.val_accuracy))
    rows.sort()
    for index, (_, accuracy) in enumerate(rows, start=1):
        if accuracy >= target:
            return index, len(rows)
    return None, len(rows)


def table(records: list[dict], out: Path) -> str:
    """The markdown table; trial-epochs to target are recomputed from the sweep directories (targets may have changed)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        sweep_dir = out / f"{record['task']}-{record['method']}-{record['seed']}"
        if sweep_dir.is_dir():
            record = record | dict(zip(("to_target", "spent"), trial_epochs_to_target(sweep_dir, TARGETS[record["task"]])))
        groups.setdefault((record["task"], record["method"]), []).append(record)
    lines = ["| task | method | seeds | best val acc | test acc (best trial) | trial-epochs to target (sweeps reaching it) | trial-epochs spent "
             "| exploits (llm) | wall s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (task, method), runs in groups.items():
        reached = [run["to_target"] for run in runs if run["to_target"] is not None]
        to_target = f"{statistics.median(reached):.0f} ({len(reached)}/{len(runs)})" if reached else f"never (0/{len(runs)})"
        lines.append(f"| {task} | {method} | {len(runs)} | {statistics.median(run['best_val'] for run in runs):.4f} "
                     f"| {statistics.median(run['test'] or 0.0 for run in runs):.4f} | {to_target} | {statistics.median(run['spent'] for run in runs):.0f} "
                     f"| {statistics.median(run['exploits'] for run in runs):.0f} ({statistics.median(run['llm'] for run in runs):.0f}) "
                     f"| {statistics.median(run['wall_s'] for run in runs):.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["digits", "hard"], choices=list(TARGETS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers per trial")
    parser.add_argument("--out", type=Path, default=None, help="benchmark directory (default: a new temporary one)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="hybridtrain-sweep-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.jsonl"
    records = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.is_file() else []
    done = {(r["task"], r["method"], r["seed"]) for r in records}

    import ray

    from cluster.experiment import build_config
    from cluster.sweep import run_sweep

    ray.init(address="local", num_cpus=max(args.trials * args.workers // 2, 1) + 2, include_dashboard=False, log_to_driver=False)
    hard = make_hard_task(out / "hard.npz")
    started_all = time.perf_counter()
    for seed in range(args.seeds):
        for task in args.tasks:
            task_sets = [] if task == "digits" else [f"data.path={hard}", "model.kind=mlp", "model.width=64"]
            for method in args.methods:
                if (task, method, seed) in done:
                    continue
                sweep_dir = out / f"{task}-{method}-{seed}"
                sets = [*task_sets, *METHODS[method], f"tune.num_samples={args.trials}", f"train.epochs={args.epochs}",
                        f"train.num_workers={args.workers}", f"train.seed={seed}", f"data.seed={seed}", f"tune.seed={seed}",
                        "tune.perturbation_interval=2", "tune.grace_period=2",
                        "tune.space={train.lr: {loguniform: [1.0e-4, 3.0e-2]}, model.dropout: {uniform: [0.0, 0.4]}}"]
                started = time.perf_counter()
                summary = run_sweep(build_config(recipe="smoke", sweep=True, overrides=sets), sweep_dir)
                to_target, spent = trial_epochs_to_target(sweep_dir, TARGETS[task])
                record = {"task": task, "method": method, "seed": seed, "best_val": summary["best_score"], "test": summary["best_test_accuracy"],
                          "to_target": to_target, "spent": spent, "wall_s": time.perf_counter() - started, "exploits": summary["exploits"],
                          "llm": summary["llm_explores"], "fallbacks": summary["fallbacks"]}
                records.append(record)
                with open(results_file, "a") as log:
                    log.write(json.dumps(record) + "\n")
                print(f"[bench] {json.dumps(record)}  ({time.perf_counter() - started_all:.0f}s so far)", flush=True)
    print(f"\n{args.trials} trials x {args.epochs} epochs x {args.workers} workers per sweep; medians over seeds; targets {TARGETS}; "
          f"results in {out}")
    print(table(records, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
