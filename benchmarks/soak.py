"""Soak: advised runs back to back for a while, each with a fault drawn at random, each audited for loss.

Every run is a small advised smoke run (digits, 2 DeepSpeed workers, the coordinator actor and a
scripted advisor that proposes at every other epoch), on one embedded Ray. Faults drawn from:

  none                  no fault (the control)
  worker_mid_epoch      a training worker SIGKILLed half-way through a random epoch (Train restarts the group)
  worker_in_probation   a training worker SIGKILLed during a proposal's probation
  coordinator           the coordinator actor killed after a random epoch (Ray restarts it, rank 0 restores its run)
  truncated_checkpoint  the run dies (no retries left), its newest checkpoint is cut in half, `--resume` continues
  garbage_advice        the advisor answers with text that is not a proposal

(A killed driver needs a second process; tests/test_run_lifecycle_e2e.py covers it.) After each run,
`cluster.audit.audit_run` checks that nothing was lost. Prints one line per run and a table at the end;
writes soak.jsonl under --out.

    python benchmarks/soak.py --minutes 60 [--seed 0] [--out /tmp/soak]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
import traceback
from collections import Counter
from pathlib import Path

FAULTS = ("none", "worker_mid_epoch", "worker_in_probation", "coordinator", "truncated_checkpoint", "garbage_advice")
EPOCHS = 5
BASE = [f"train.epochs={EPOCHS}", "train.num_workers=2", "train.early_stopping_patience=0", "train.checkpoint_every=2", "train.max_failures=1",
        "coordinator.query_interval=1", "coordinator.burn_in_epochs=1", "coordinator.probation_steps=4", "coordinator.cache_enabled=false",
        "advisor.backend=scripted"]
GOOD = [{"weights": [{"op": "shrink", "group": "classifier.4.weight", "amount": 0.2}], "reason": "shrink the head"},
        {"hyperparameters": {"lr_scale": 0.7}, "reason": "a smaller step"}]
GARBAGE = ["The previous answer is incorrect. The previous answer is:", '{"weights": [{"op": "explode", "group": "no.such',
           {"hyperparameters": {"lr_scale": "fast"}, "reason": "wrong type"}]


def _kill_coordinator_after(run_dir: Path, name: str, epoch: int, done: threading.Event, killed: list[int]) -> None:
    import pandas as pd
    import ray

    while not done.is_set():
        try:
            if len(pd.read_csv(run_dir / "metrics.csv")) >= epoch:
                ray.kill(ray.get_actor(name, namespace=ray.get_runtime_context().namespace), no_restart=False)
                killed.append(epoch)
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)


def soak_once(fault: str, run_dir: Path, rng: random.Random) -> dict:
    from cluster.audit import audit_run
    from cluster.experiment import build_config
    from cluster.launch import RAY_RUN_NAME, RAY_STORAGE, RunError, plan_run, run_experiment

    run_dir.mkdir(parents=True)
    script = run_dir.parent / f"{run_dir.name}-script.json"
    script.write_text(json.dumps(GARBAGE if fault == "garbage_advice" else GOOD))
    overrides = [*BASE, f"advisor.script={script}", f"train.seed={rng.randrange(1000)}"]
    injected = fault
    if fault == "worker_mid_epoch":
        epoch = rng.randint(2, EPOCHS)
        overrides += [f"faults.kill_epoch={epoch}"]
        injected = f"{fault} (epoch {epoch})"
    elif fault == "worker_in_probation":
        overrides += ["faults.kill_epoch=4", "faults.kill_in=probation"]  # answers are tried at epochs 2 and 4
    elif fault == "truncated_checkpoint":
        overrides += ["train.checkpoint_every=1", "train.max_failures=0", f"faults.kill_epoch={rng.randint(3, EPOCHS)}"]
    config = build_config(recipe="smoke", overrides=overrides)
    run_dir = run_dir / "run"
    done, killer, killed = threading.Event(), None, []
    if fault == "coordinator":
        epoch = rng.randint(1, EPOCHS - 2)
        injected = f"{fault} (after epoch {epoch})"
        killer = threading.Thread(target=_kill_coordinator_after, args=(run_dir, plan_run(config, run_dir).coordinator_name, epoch, done, killed), daemon=True)
        killer.start()
    started = time.perf_counter()
    try:
        if fault == "truncated_checkpoint":
            try:
                run_experiment(config, run_dir)
                raise AssertionError("the run survived a fault it had no retries for")
            except RunError:
                pass
            checkpoints = sorted(path for path in (run_dir / RAY_STORAGE / RAY_RUN_NAME).glob("checkpoint_*") if path.is_dir())
            damaged = max(checkpoints[-1].rglob("*.pt"), key=lambda path: path.stat().st_size)
            damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
            injected = f"{fault} ({damaged.parent.parent.name}/{damaged.name})"
            summary = run_experiment(None, run_dir, resume=True)
        else:
            summary = run_experiment(config, run_dir)
        problems = audit_run(run_dir)
        survived = True
    except Exception as error:  # noqa: BLE001 - a soak reports every failure and goes on
        summary, problems, survived = {}, [f"{type(error).__name__}: {error}", traceback.format_exc(limit=3)], False
    finally:
        done.set()
    # Whether the fault really struck (a run can end before its kill comes).
    happened = {"none": True, "coordinator": bool(killed), "truncated_checkpoint": injected != fault,
                "garbage_advice": bool(summary.get("proposals_invalid"))}.get(fault, (run_dir / ".chaos_killed").exists())
    return {"fault": fault, "injected": injected, "happened": happened, "survived": survived, "lost": problems, "wall_s": time.perf_counter() - started,
            "restarts": summary.get("restarts"), "test_accuracy": summary.get("test_accuracy"),
            "proposals_invalid": summary.get("proposals_invalid"), "errors": summary.get("errors"),
            "checkpoint_problems": len(summary.get("checkpoint_problems", []))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from cluster.runtime import ClusterConfig, connect

    out = args.out or Path(tempfile.mkdtemp(prefix="hybridtrain-soak-"))
    out.mkdir(parents=True, exist_ok=True)
    connect(ClusterConfig(dashboard=False, num_cpus=6), min_cpus=3)
    rng = random.Random(args.seed)
    deadline = time.monotonic() + 60 * args.minutes
    rows: list[dict] = []
    while time.monotonic() < deadline:
        fault = rng.choice(FAULTS)
        row = soak_once(fault, out / f"{len(rows):03d}-{fault}", rng)
        rows.append(row)
        with open(out / "soak.jsonl", "a") as stream:
            stream.write(json.dumps(row) + "\n")
        verdict = "survived" if row["survived"] else "FAILED"
        struck = "" if row["happened"] else " (the fault did not strike)"
        print(f"[soak] {len(rows):3d} {row['injected']:45s} {verdict:8s} lost: {row['lost'] or 'nothing'}  {row['wall_s']:.0f}s{struck}", flush=True)
    print(f"\nsoak: {len(rows)} runs in {args.minutes:g} min (seed {args.seed}) -> {out}")
    print(f"{'fault':22s} {'runs':>5s} {'struck':>7s} {'survived':>9s} {'with loss':>10s}")
    for fault, count in sorted(Counter(row["fault"] for row in rows).items()):
        mine = [row for row in rows if row["fault"] == fault]
        print(f"{fault:22s} {count:5d} {sum(row['happened'] for row in mine):7d} {sum(row['survived'] for row in mine):9d} "
              f"{sum(bool(row['lost']) for row in mine):10d}")
    failed = [row for row in rows if not row["survived"] or row["lost"]]
    print(f"total: {len(rows)} runs, {len(rows) - len(failed)} survived with nothing lost, {len(failed)} not")


if __name__ == "__main__":
    main()
