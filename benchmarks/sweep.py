"""Compare sweep methods at the same budget: PBT with and without LLM-guided explore, PB2, ASHA, random search.

    python benchmarks/sweep.py                          # digits and a generated harder task, 3 seeds, every method
    python benchmarks/sweep.py --tasks digits --seeds 1 --methods pbt asha random   # a quicker look

Every method gets the same population (`--trials`) and epochs per trial (`--epochs`), so the same budget of
trial-epochs at most (ASHA stops some trials early and spends less; the table says how much). Printed per
task and method, as the median over seeds: the best trial's validation accuracy, its test accuracy,
trial-epochs until some trial first reached `--target` validation accuracy, trial-epochs spent, wall time.

The harder task is made here, offline: scikit-learn's `make_classification` (64 features, 10 classes, few
informative dimensions, label noise), written to an `.npz`, trained with the MLP.
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


def make_hard_task(path: Path, seed: int = 0) -> Path:
    import numpy as np
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=3000, n_features=64, n_informative=12, n_redundant=8, n_classes=10, n_clusters_per_class=2,
                               flip_y=0.05, class_sep=0.8, random_state=seed)
    np.savez(path, x=x.astype("float32"), y=y.astype("int64"))
    return path


def trial_epochs_to_target(sweep_dir: Path, target: float) -> tuple[float | None, int]:
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["digits", "hard"], choices=["digits", "hard"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--target", type=float, default=0.95, help="validation accuracy to reach (digits; the hard task uses target - 0.35)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="hybridtrain-sweep-bench-")))
    args = parser.parse_args()

    import ray

    from cluster.experiment import build_config
    from cluster.sweep import run_sweep

    ray.init(num_cpus=args.trials + 2, include_dashboard=False, log_to_driver=False)
    hard = make_hard_task(args.out / "hard.npz")
    table = []
    for task in args.tasks:
        target = args.target if task == "digits" else args.target - 0.35
        task_sets = [] if task == "digits" else [f"data.path={hard}", "model.kind=mlp", "model.width=64"]
        for method in args.methods:
            runs = []
            for seed in range(args.seeds):
                sweep_dir = args.out / f"{task}-{method}-{seed}"
                sets = [*task_sets, *METHODS[method], f"tune.num_samples={args.trials}", f"train.epochs={args.epochs}", f"train.seed={seed}",
                        f"data.seed={seed}", "tune.perturbation_interval=2", "tune.grace_period=2",
                        "tune.space={train.lr: {loguniform: [1.0e-4, 3.0e-2]}, model.dropout: {uniform: [0.0, 0.4]}}"]
                started = time.perf_counter()
                summary = run_sweep(build_config(recipe="smoke", sweep=True, overrides=sets), sweep_dir)
                to_target, spent = trial_epochs_to_target(sweep_dir, target)
                runs.append({"best_val": summary["best_score"], "test": summary["best_test_accuracy"], "to_target": to_target, "spent": spent,
                             "wall_s": time.perf_counter() - started, "exploits": summary["exploits"], "llm": summary["llm_explores"]})
                print(f"[bench] {task} {method} seed {seed}: {json.dumps(runs[-1])}", flush=True)
            reached = [run["to_target"] for run in runs if run["to_target"] is not None]
            table.append({"task": task, "method": method,
                          "best_val": statistics.median(run["best_val"] for run in runs),
                          "test": statistics.median(run["test"] or 0.0 for run in runs),
                          "to_target": f"{statistics.median(reached):.0f} ({len(reached)}/{len(runs)})" if reached else f"never (0/{len(runs)})",
                          "spent": statistics.median(run["spent"] for run in runs),
                          "wall_s": statistics.median(run["wall_s"] for run in runs)})
    print(f"\n{args.seeds} seed(s), {args.trials} trials x {args.epochs} epochs each; medians over seeds; results in {args.out}")
    print("| task | method | best val acc | test acc (best trial) | trial-epochs to target (runs reaching it) | trial-epochs spent | wall s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in table:
        print(f"| {row['task']} | {row['method']} | {row['best_val']:.4f} | {row['test']:.4f} | {row['to_target']} | {row['spent']:.0f} | {row['wall_s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
