"""What neuron-group coupling costs against per-layer coupling, per layer width (CPU, one process).

    python benchmarks/coupling_cost.py

Per width: alphas the coordinator keeps for the layer (1 against ceil(log2(width))), the time to cluster
the units (k-means on two statistics per unit, every `coordinator.regroup_every` epochs), and the time to
blend one proposal into the layer's weight (one alpha against one per row by group). Medians of repeats.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestration.protocol import WeightOp  # noqa: E402
from workers.blending import apply_weight_ops  # noqa: E402
from workers.coupling import group_count, unit_groups  # noqa: E402

FAN_IN = 256
REPEATS = 15


def _median_s(call) -> float:
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    rng = np.random.default_rng(0)
    print(f"| width | alphas per layer | cluster units (ms) | blend, per layer (ms) | blend, per group (ms) | blend ratio |\n|---:|---:|---:|---:|---:|---:|")
    for width in (64, 256, 1024, 4096):
        weight = torch.randn(width, FAN_IN)
        stats = np.c_[rng.normal(0, 1, width), rng.uniform(0, 1, width)]
        labels = unit_groups({"fc": stats}, seed=0)["fc"]
        op = [WeightOp(op="shrink", group="fc.weight", amount=0.1)]
        per_group = {f"fc.weight#{group}": 0.1 + 0.01 * group for group in range(labels.max() + 1)}
        cluster = _median_s(lambda: unit_groups({"fc": stats}, seed=0))
        layer = _median_s(lambda: apply_weight_ops({"fc.weight": weight}, op, {"fc.weight": 0.1}, seed=0))
        grouped = _median_s(lambda: apply_weight_ops({"fc.weight": weight}, op, per_group, seed=0, unit_groups={"fc": labels}))
        print(f"| {width} | 1 vs {group_count(width)} | {cluster * 1e3:.2f} | {layer * 1e3:.3f} | {grouped * 1e3:.3f} | {grouped / layer:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
