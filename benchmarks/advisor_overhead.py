"""Wall time per epoch of advised vs unadvised training, in one run of this script.

Trains the same recipe twice on the embedded local Ray: once with `advisor.backend=none`, once
with the advisor (default: the real SmolLM2 through Ray Serve). Prints the median wall seconds per
epoch of each, the advised run's time with probation taken out, their ratios, the time spent on
probation, accepted/rejected counts and both runs' test accuracy.

    python benchmarks/advisor_overhead.py [--backend smollm2|heuristic] [--epochs 12]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import pandas as pd

from cluster.runtime import ClusterConfig, connect
from cluster.experiment import build_config
from cluster.launch import run_experiment


def per_epoch(run_dir: Path) -> tuple[list[float], list[float]]:
    metrics = pd.read_csv(run_dir / "metrics.csv")
    wall = metrics.wall_s.diff().fillna(metrics.wall_s.iloc[0]).tolist()
    return wall, metrics.probation_s.tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="smollm2")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="hybridtrain-overhead-")))
    args = parser.parse_args()
    connect(ClusterConfig(dashboard=False), min_cpus=4)
    # Fully asynchronous, as on a real workload: training never waits for the advisor; an answer is
    # applied at the first epoch boundary after it arrives (however many epochs that takes here).
    common = [f"train.epochs={args.epochs}", "train.early_stopping_patience=0", "coordinator.wait_for_answer_s=0",
              f"coordinator.max_answer_age_epochs={args.epochs}"]
    unadvised = run_experiment(build_config(recipe="smoke", overrides=[*common, "advisor.backend=none"]), args.out / "unadvised")
    advised = run_experiment(build_config(recipe="smoke", overrides=[*common, f"advisor.backend={args.backend}"]), args.out / "advised")

    base_wall, _ = per_epoch(args.out / "unadvised")
    wall, probation = per_epoch(args.out / "advised")
    base = statistics.median(base_wall[1:])
    advised_median = statistics.median(wall[1:])
    outside = statistics.median([w - p for w, p in zip(wall[1:], probation[1:])])
    print(f"\nadvisor overhead on digits ({args.epochs} epochs, smoke recipe, advisor {args.backend}; median over epochs 2..N)")
    print(f"  unadvised               {base:7.3f} s/epoch")
    print(f"  advised, all            {advised_median:7.3f} s/epoch   ratio {advised_median / base:5.2f}x")
    print(f"  advised, w/o probation  {outside:7.3f} s/epoch   ratio {outside / base:5.2f}x   (target <= 1.10x)")
    print(f"  probation total         {sum(probation):7.2f} s over {sum(1 for p in probation if p > 0)} proposals")
    print(f"  queries {advised.get('advisor_queries', 0)}, cache hits {advised.get('cache_hits', 0)}, accepted {advised.get('proposals_accepted', 0)}, "
          f"rejected {advised.get('proposals_rejected', 0)}, invalid {advised.get('proposals_invalid', 0)}, stale {advised.get('answers_stale', 0)}")
    print(f"  test accuracy: unadvised {unadvised['test_accuracy']:.4f}, advised {advised['test_accuracy']:.4f}")


if __name__ == "__main__":
    main()
