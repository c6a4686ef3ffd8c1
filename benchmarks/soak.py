"""Soak: advised runs back to back for a while, each with a fault drawn at random, each audited for loss.

Every run is a small advised smoke run (digits, 2 DeepSpeed workers, the coordinator actor and a
scripted advisor that proposes at every other epoch), on one embedded Ray. Faults drawn from:

  none                  no fault (the control)
  worker_mid_epoch      a training worker SIGKILLed half-way through a random epoch (Train restarts the group)
  worker_in_probation   a training worker SIGKILLed during a proposal's probation
  coordinator           the coordinator actor killed after a random epoch (Ray restarts it, rank 0 restores its run)
  truncated_checkpoint  the run dies (no retries left), its newest checkpoint is cut in half, `--resume` continues
  garbage_advice        the advisor answers with text that is not a proposal
  disk_full             ENOSPC at a drawn write point (inside a checkpoint, metrics.csv, the final model or metrics,
                        the ledger, the summary; `faults.disk_full`): the run fails (no retries), `--resume` finishes it
  sigterm_driver        the driver gets SIGTERM at a drawn moment (start-up, mid-epoch, a probation, the final report,
                        or a random second): it stops cleanly (`cluster.stopping`), `--resume` finishes it
  torn_summary          a finished run's summary.json is cut (0 bytes or half, a full disk or a kill while it was
                        written in place): `--resume` evaluates the last checkpoint again and writes it whole

(A SIGKILLed driver needs a second process; tests/test_run_lifecycle_e2e.py covers it.) After each run,
`cluster.audit.audit_run` checks that nothing was lost. Prints one line per run and a table at the end;
writes soak.jsonl under --out.

    python benchmarks/soak.py --minutes 60 [--seed 0] [--out /tmp/soak] [--faults disk_full,sigterm_driver,torn_summary]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import tempfile
import threading
import time
import traceback
from collections import Counter
from pathlib import Path

FAULTS = ("none", "worker_mid_epoch", "worker_in_probation", "coordinator", "truncated_checkpoint", "garbage_advice", "disk_full", "sigterm_driver",
          "torn_summary")
DISK_FULL_POINTS = ("checkpoint", "metrics.csv", "model.safetensors", "final_metrics.json", "interventions.csv", "summary.json")
SIGTERM_MOMENTS = ("start-up", "mid-epoch", "probation", "final report", "random second")
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


def _sigterm_when(run_dir: Path, moment: str, seconds: float, done: threading.Event, sent: list[str]) -> None:
    """SIGTERM this process (the driver) at `moment` of the run in `run_dir`, from a thread (the handler runs in the main one)."""
    started = time.monotonic()
    ready = {"start-up": lambda: (run_dir / "config.yaml").is_file(),
             "mid-epoch": lambda: (run_dir / "metrics.csv").is_file() and len((run_dir / "metrics.csv").read_text().splitlines()) > int(seconds),
             "final report": lambda: (run_dir / "final_metrics.json").is_file(),
             "random second": lambda: time.monotonic() - started > seconds}[moment]
    while not done.is_set():
        try:
            if ready():
                sent.append(moment)
                os.kill(os.getpid(), signal.SIGTERM)
                return
        except OSError:
            pass
        time.sleep(0.05)


def _finish_stopped(run_dir: Path, stopped: list[str], *, tries: int = 3) -> dict:
    """`--resume` a run its driver was stopped in until it finishes (a resume may be stopped too; say each stop)."""
    from cluster.launch import run_experiment
    from cluster.rundir import read_json
    from cluster.stopping import DriverStopped

    for _ in range(tries):
        if (run_dir / "summary.json").is_file() and read_json(run_dir / "summary.json") is not None:
            return read_json(run_dir / "summary.json")  # the stop came after the summary: the run had finished
        try:
            return run_experiment(None, run_dir, resume=True)
        except DriverStopped as stop:
            stopped.append(str(stop))
    raise AssertionError(f"not finished after {tries} resumes: {stopped}")


def soak_once(fault: str, run_dir: Path, rng: random.Random) -> dict:
    from cluster.audit import audit_run
    from cluster.experiment import build_config
    from cluster.launch import RAY_RUN_NAME, RAY_STORAGE, RunError, plan_run, run_experiment
    from cluster.stopping import DriverStopped

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
    elif fault == "disk_full":
        point, epoch = rng.choice(DISK_FULL_POINTS), rng.randint(1, EPOCHS)
        overrides += ["train.max_failures=0", f"faults.disk_full=[{point}]", f"faults.disk_full_epoch={epoch}"]
        injected = f"{fault} ({point}" + (f", epoch {epoch})" if point in ("checkpoint", "metrics.csv") else ")")
    moment, seconds = None, 0.0
    if fault == "sigterm_driver":
        moment = rng.choice(SIGTERM_MOMENTS)
        seconds = {"mid-epoch": rng.randint(1, EPOCHS - 1), "random second": rng.uniform(0, 60)}.get(moment, 0.0)
        injected = f"{fault} ({moment}" + (f" {seconds:.0f}" if seconds else "") + ")"
        if moment == "probation":  # a moment inside a worker: the last rank sends it (`faults.stop_driver_*`)
            overrides += ["faults.stop_driver_epoch=2", "faults.stop_driver_in=probation"]
    config = build_config(recipe="smoke", overrides=overrides)
    run_dir = run_dir / "run"
    done, killer, killed, stopped = threading.Event(), None, [], []
    if fault == "sigterm_driver" and moment != "probation":
        threading.Thread(target=_sigterm_when, args=(run_dir, moment, seconds, done, killed), daemon=True).start()
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
        elif fault == "disk_full":
            try:
                summary = run_experiment(config, run_dir)
            except RunError as error:  # the full disk failed the run: the error must say so, the resume must finish it
                assert "the disk is full (ENOSPC)" in str(error) and "--resume" in str(error), str(error)[:2000]
                stopped.append(str(error).splitlines()[0][:160])
                summary = run_experiment(None, run_dir, resume=True)
        elif fault == "sigterm_driver":
            try:
                summary = run_experiment(config, run_dir)
            except DriverStopped as stop:
                stopped.append(str(stop))
                summary = _finish_stopped(run_dir, stopped)
        elif fault == "torn_summary":
            run_experiment(config, run_dir)
            whole = (run_dir / "summary.json").read_bytes()
            cut = rng.choice([0, len(whole) // 2])
            (run_dir / "summary.json").write_bytes(whole[:cut])  # as a write in place cut off by a full disk or a kill leaves it
            injected = f"{fault} ({cut} of {len(whole)} bytes)"
            summary = run_experiment(None, run_dir, resume=True)
        else:
            summary = run_experiment(config, run_dir)
        problems = audit_run(run_dir)
        survived = True
    except (Exception, DriverStopped) as error:  # noqa: BLE001 - a soak reports every failure and goes on
        summary, problems, survived = {}, [f"{type(error).__name__}: {error}", traceback.format_exc(limit=3)], False
    finally:
        done.set()
    # Whether the fault really struck (a run can end before its kill comes).
    happened = {"none": True, "coordinator": bool(killed), "truncated_checkpoint": injected != fault,
                "garbage_advice": bool(summary.get("proposals_invalid")), "disk_full": bool(stopped), "sigterm_driver": bool(stopped),
                "torn_summary": True}.get(fault, (run_dir / ".chaos_killed").exists())
    return {"fault": fault, "injected": injected, "happened": happened, "survived": survived, "lost": problems, "wall_s": time.perf_counter() - started,
            "stopped": stopped, "restarts": summary.get("restarts"), "test_accuracy": summary.get("test_accuracy"),
            "proposals_invalid": summary.get("proposals_invalid"), "errors": summary.get("errors"),
            "checkpoint_problems": len(summary.get("checkpoint_problems", []))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"the faults to draw from, comma-separated (default: all of {', '.join(FAULTS)})")
    args = parser.parse_args()
    draw = tuple(args.faults.split(","))
    if not draw or set(draw) - set(FAULTS):
        parser.error(f"--faults: unknown {sorted(set(draw) - set(FAULTS))}; choose from {FAULTS}")
    from cluster.runtime import ClusterConfig, connect

    out = args.out or Path(tempfile.mkdtemp(prefix="hybridtrain-soak-"))
    out.mkdir(parents=True, exist_ok=True)
    connect(ClusterConfig(dashboard=False, num_cpus=6), min_cpus=3)
    # A SIGTERM the soak sends itself lands in a run's handler (`cluster.stopping`); one that comes just after the
    # run ended reaches this one instead of Ray's (which would end the soak), and is only counted.
    late: list[float] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: late.append(time.monotonic()))
    rng = random.Random(args.seed)
    deadline = time.monotonic() + 60 * args.minutes
    rows: list[dict] = []
    while time.monotonic() < deadline:
        fault = rng.choice(draw)
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
    print(f"total: {len(rows)} runs, {len(rows) - len(failed)} survived with nothing lost, {len(failed)} not"
          + (f"; {len(late)} SIGTERM(s) came after their run had ended" if late else ""))


if __name__ == "__main__":
    main()
