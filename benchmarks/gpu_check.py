"""The GPU path without Ray, in one process on one GPU (an NCCL world of one), for a lent GPU machine.

What it checks, each on its own so one failure does not hide the rest:
  engine      DeepSpeed engine on CUDA in bf16 at ZeRO 0, 1, 2, 3 (a ResNet): losses finite and falling,
              full fp32 master weights read and written back exactly, the state digest computable
  rollback    under ZeRO-3 on the GPU: a blended proposal tried on probation and rejected leaves the whole
              training state bit-identical (digest); accepted, the weights are (1 - alpha) * W + alpha * W_llm
  throughput  ResNet training samples/s on the generated CIFAR-like task (`benchmarks/cifar_like.py`), the
              product's micro-step (host batch -> device, bf16 forward, fp32 loss, engine backward/step)

What it cannot check there (the device image has PyTorch but not Ray): Ray Train's NCCL process group
across workers, the Serve advisor on a GPU, streamed data through Ray Data. Those run in CI on CPU (gloo).

    python benchmarks/gpu_check.py --out DIR     # DIR/gpu_check.json, one entry per check; exit 1 if any failed
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from workers.config import ModelConfig, TrainConfig  # noqa: E402
from workers.engine import build_engine, full_fp32_params, input_dtype, state_digest, write_full_fp32_params  # noqa: E402
from workers.models import build_model  # noqa: E402

DEVICE = torch.device("cuda", 0)  # `--cpu` (a dry run of the script itself, gloo and fp32) sets it to the CPU


def process_group() -> None:
    """A group of one (NCCL on the GPU), set up the way Ray Train leaves it for DeepSpeed."""
    import torch.distributed as dist

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29531")
    if DEVICE.type == "cuda":
        torch.cuda.set_device(DEVICE)
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=DEVICE)
    else:
        dist.init_process_group("gloo", rank=0, world_size=1)


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def peak_mb() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if DEVICE.type == "cuda" else None


def engine_for(stage: int, *, width: int = 16, depth: int = 1, batch_size: int = 128, steps_per_epoch: int = 50, lr: float = 3e-3, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(kind="resnet", width=width, depth=depth, dropout=0.0), (3, 32, 32), 10)
    train = TrainConfig(zero_stage=stage, num_workers=1, precision="auto", batch_size=batch_size, lr=lr, epochs=2)
    return build_engine(model, train, world_size=1, micro_steps_per_epoch=steps_per_epoch, device=DEVICE)


def step(engine, spec, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    """The product's micro-step (`workers.epoch.train_step`): host tensors in, fp32 loss, engine backward and step."""
    target = labels.to(DEVICE, non_blocking=True)
    logits = engine(inputs.to(DEVICE, input_dtype(spec), non_blocking=True)).float()
    loss = F.cross_entropy(logits, target)
    engine.backward(loss)
    engine.step()
    return float(loss.detach())


def batch(x: torch.Tensor, y: torch.Tensor, index: int, size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """The `index`-th batch of `size`, wrapping around the data."""
    start = (index * size) % (len(x) - size + 1)
    return x[start:start + size], y[start:start + size]


def task(samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The generated CIFAR-like images, normalised per channel, as host tensors (N, 3, 32, 32) and labels."""
    from benchmarks.cifar_like import make_images

    images, labels = make_images(samples=samples, seed=0)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    mean, std = x.mean(dim=(0, 2, 3), keepdim=True), x.std(dim=(0, 2, 3), keepdim=True)
    return ((x - mean) / std).contiguous(), torch.from_numpy(labels).long()


def check_engine(x: torch.Tensor, y: torch.Tensor) -> dict:
    stages = {}
    for stage in (0, 1, 2, 3):
        engine, spec = engine_for(stage)
        losses = [step(engine, spec, *batch(x, y, i)) for i in range(40)]
        params = full_fp32_params(engine)
        target = {name: value * 0.5 for name, value in params.items()}
        write_full_fp32_params(engine, target)
        written = full_fp32_params(engine)
        exact = all(torch.equal(written[name], target[name]) for name in target)
        module_dtype = str(next(engine.module.parameters()).dtype)
        digest = state_digest(engine, {"lr": 0.0})
        stages[stage] = {"precision": spec.precision, "module_dtype": module_dtype, "master_dtype": str(params[next(iter(params))].dtype),
                         "first_loss": round(losses[0], 4), "last_loss": round(sum(losses[-5:]) / 5, 4),
                         "losses_finite": all(math.isfinite(v) and abs(v) < 1e6 for v in losses), "write_read_exact": exact,
                         "digest_prefix": digest[:12], "peak_mem_mb": peak_mb()}
        ok = stages[stage]["losses_finite"] and exact and stages[stage]["last_loss"] < stages[stage]["first_loss"] and spec.precision == ("bf16" if DEVICE.type == "cuda" else "fp32")
        stages[stage]["ok"] = bool(ok)
        del engine
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
    return {"ok": all(s["ok"] for s in stages.values()), "stages": stages}


def check_rollback(x: torch.Tensor, y: torch.Tensor, folder: Path) -> dict:
    from orchestration.protocol import Apply, ProbationMetrics, Proposal, Verdict, WeightOp
    from workers.blending import propose_tensor
    from workers.probation import ProbationRunner, WeightReferences

    engine, spec = engine_for(3)
    for i in range(20):
        step(engine, spec, *batch(x, y, i))
    runner = ProbationRunner(engine=engine, rank=0, batch_size=128, rollback_dir=folder / "rollback", verify_rollback=True)
    group, alpha = "head.3.weight", 0.5
    decision = Apply(query_id="gpu-q1", proposal=Proposal(weights=[WeightOp(op="shrink", group=group, amount=0.3)]), alphas={group: alpha},
                     source="advisor", epoch_asked=1, probation_steps=3, reward_mode="counterfactual", reset_optimizer_moments=False, seed=0)

    def run_probation(micro_steps: int) -> ProbationMetrics:
        losses = [step(engine, spec, *batch(x, y, 20 + i)) for i in range(micro_steps)]
        return ProbationMetrics(val_loss=sum(losses) / len(losses))

    before = state_digest(engine, runner.hyperparameters())
    weights = full_fp32_params(engine)
    rejected = runner.run(decision, WeightReferences(params=weights), run_probation=run_probation, epoch_metrics=ProbationMetrics(val_loss=1.0),
                          judge=lambda candidate, reference, problem: Verdict(accepted=False, reward=-1.0, reason="gpu check: reject"))
    after_reject = state_digest(engine, runner.hyperparameters())
    accepted = runner.run(decision, WeightReferences(params=weights), run_probation=run_probation, epoch_metrics=ProbationMetrics(val_loss=1.0),
                          judge=lambda candidate, reference, problem: Verdict(accepted=True, reward=1.0, reason="gpu check: accept"))
    proposed = propose_tensor(decision.proposal.weights[0], weights[group])
    expected = (1 - alpha) * weights[group] + alpha * proposed
    now = full_fp32_params(engine)
    others_kept = all(torch.equal(now[name], weights[name]) for name in weights if name != group)
    blend_error = float((now[group] - expected).abs().max())
    result = {"rollback_exact": bool(rejected.rollback_exact) and before == after_reject, "rejected_probation_s": round(rejected.probation_s, 2),
              "accepted": accepted.accepted, "blend_max_abs_error": blend_error, "other_groups_unchanged": others_kept}
    result["ok"] = result["rollback_exact"] and accepted.accepted and blend_error < 1e-6 and others_kept
    return result


def check_throughput(x: torch.Tensor, y: torch.Tensor) -> dict:
    """samples/s of training steps after a warm-up, per (model, batch, stage); CUDA-synchronised timing."""
    rows = []
    for width, depth, batch_size, stage in ((16, 1, 128, 0), (16, 1, 512, 0), (64, 2, 512, 0), (64, 2, 512, 2), (64, 2, 512, 3)):
        engine, spec = engine_for(stage, width=width, depth=depth, batch_size=batch_size, steps_per_epoch=len(x) // batch_size)
        batches = len(x) // batch_size
        pinned_x, pinned_y = (x.pin_memory(), y.pin_memory()) if DEVICE.type == "cuda" else (x, y)
        for i in range(5):
            step(engine, spec, pinned_x[i * batch_size:(i + 1) * batch_size], pinned_y[i * batch_size:(i + 1) * batch_size])
        synchronize()
        started = time.perf_counter()
        for i in range(batches):
            step(engine, spec, pinned_x[i * batch_size:(i + 1) * batch_size], pinned_y[i * batch_size:(i + 1) * batch_size])
        synchronize()
        elapsed = time.perf_counter() - started
        rows.append({"model": f"resnet width={width} depth={depth}", "batch_size": batch_size, "zero_stage": stage, "precision": spec.precision,
                     "samples": batches * batch_size, "seconds": round(elapsed, 2), "samples_per_s": round(batches * batch_size / elapsed),
                     "peak_mem_mb": peak_mb()})
        print(json.dumps(rows[-1]), flush=True)
        del engine
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    return {"ok": all(row["samples_per_s"] > 0 for row in rows), "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=25_000, help="generated images (20,000 in the train split at 80/10/10)")
    parser.add_argument("--cpu", action="store_true", help="dry-run the script on the CPU (gloo, fp32), e.g. --samples 2000")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    global DEVICE
    if args.cpu:
        DEVICE = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device; nothing to check (--cpu dry-runs the script)", file=sys.stderr)
        return 2
    import deepspeed

    report: dict = {"torch": torch.__version__, "cuda": torch.version.cuda, "deepspeed": deepspeed.__version__, "python": platform.python_version(),
                    "gpu": torch.cuda.get_device_name(0) if DEVICE.type == "cuda" else None,
                    "bf16_supported": DEVICE.type == "cuda" and torch.cuda.is_bf16_supported(), "checks": {}}
    process_group()
    started = time.perf_counter()
    x, y = task(args.samples)
    report["task"] = {"samples": len(x), "generate_s": round(time.perf_counter() - started, 1)}
    train_x, train_y = x[: int(0.8 * len(x))], y[: int(0.8 * len(y))]
    for name, check in (("engine", lambda: check_engine(train_x, train_y)), ("rollback", lambda: check_rollback(train_x, train_y, Path(tempfile.mkdtemp(prefix="gpu_check-")))),
                        ("throughput", lambda: check_throughput(train_x, train_y))):
        started = time.perf_counter()
        try:
            report["checks"][name] = check()
        except Exception as error:  # each check reports on its own: one failure must not hide the others
            report["checks"][name] = {"ok": False, "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]}
        report["checks"][name]["seconds"] = round(time.perf_counter() - started, 1)
        print(f"gpu_check {name}: {'ok' if report['checks'][name]['ok'] else 'FAILED'} ({report['checks'][name]['seconds']} s)", flush=True)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0 if all(check["ok"] for check in report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
