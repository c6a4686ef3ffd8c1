"""Check a finished run directory for loss: what the fault tests and the soak benchmark assert.

"Nothing lost" means: `metrics.csv` has every epoch once, in order; the ledger has no duplicate row,
each query, proposal and verdict once, every verdict its proposal and every proposal its query, a
rollback for each rejection; `summary.json`'s counts are the ledger's; the saved model loads and
reproduces the reported test accuracy on the run's own test split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cluster.rundir import UnreadableFileError, read_json
from orchestration.errors import NotFoundError


def audit_run(run_dir: str | Path) -> list[str]:
    """Every problem found in `run_dir` (empty when nothing was lost)."""
    import numpy as np
    import pandas as pd

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():  # every run writes it before training starts
        raise NotFoundError(f"{str(run_dir)!r} is not a run directory (no config.yaml)")
    summary_file = run_dir / "summary.json"
    try:
        summary: dict[str, Any] | None = read_json(summary_file)
    except UnreadableFileError as error:  # torn while written: the run must resume to finish it, as if it had none
        return [f"{error}; the run did not finish writing it: `hybridtrain run --resume {run_dir}` writes it again"]
    if summary is None:
        return [f"{summary_file}: missing (the run did not finish)"]
    problems = []
    metrics = pd.read_csv(run_dir / "metrics.csv")
    if list(metrics.epoch) != list(range(1, summary["epochs"] + 1)):
        problems.append(f"metrics.csv epochs {list(metrics.epoch)} are not 1..{summary['epochs']} once each")
    if not metrics.wall_s.is_monotonic_increasing:
        problems.append("metrics.csv wall_s goes backwards")
    problems += _audit_ledger(run_dir, summary)

    from cluster.experiment import read_config
    from cluster.predict import load_model, predict_arrays
    from workers.data import load_dataset, stratified_split
    from workers.streaming import TEST, iter_split, scan, wants_streaming

    config = read_config(run_dir / "config.yaml")
    model, meta = load_model(run_dir)
    if wants_streaming(config.data):  # the streamed test split, a record batch at a time (the data may not fit here)
        right = total = 0
        for chunk in iter_split(scan(config.data), TEST, normalize=False):
            predicted, _ = predict_arrays(model, meta, chunk["x"])
            right, total = right + int(np.sum(predicted == chunk["y"])), total + len(chunk["y"])
        accuracy = right / max(total, 1)
    else:
        dataset = load_dataset(config.data)
        test = stratified_split(dataset.y, val_fraction=config.data.val_fraction, test_fraction=config.data.test_fraction, seed=config.data.seed).test
        predicted, _ = predict_arrays(model, meta, dataset.x[test])
        accuracy = float(np.mean(predicted == dataset.y[test]))
    if abs(accuracy - summary["test_accuracy"]) > 1e-9:
        problems.append(f"model.safetensors predicts test accuracy {accuracy:.4f}, summary.json says {summary['test_accuracy']:.4f}")
    return problems


def _audit_ledger(run_dir: Path, summary: dict[str, Any]) -> list[str]:
    import pandas as pd

    path = run_dir / "interventions.csv"
    if summary.get("advisor", "none") == "none":
        return []
    if not path.is_file():
        return [f"{path}: missing for an advised run"]
    ledger = pd.read_csv(path, keep_default_na=False)
    problems = []
    duplicated = ledger.drop(columns=["time"]).duplicated()
    if duplicated.any():
        problems.append(f"ledger rows recorded twice: {ledger[duplicated][['kind', 'epoch', 'query_id']].values.tolist()}")
    ids = {kind: ledger[ledger.kind == kind].query_id for kind in ("query", "proposal", "verdict")}
    for kind, column in ids.items():
        if not column.is_unique:
            problems.append(f"a {kind} recorded twice: {sorted(column[column.duplicated()])}")
    if not set(ids["verdict"]) <= set(ids["proposal"]):
        problems.append(f"verdicts without a proposal: {sorted(set(ids['verdict']) - set(ids['proposal']))}")
    asked = set(ids["query"]) | set(ledger[ledger.kind == "cache_hit"].query_id)
    if not set(ids["proposal"]) <= asked:
        problems.append(f"proposals without a query: {sorted(set(ids['proposal']) - asked)}")
    verdicts = ledger[ledger.kind == "verdict"]
    rejected = int((verdicts.verdict == "rejected").sum())
    if (ledger.kind == "rollback").sum() != rejected:
        problems.append(f"{(ledger.kind == 'rollback').sum()} rollbacks for {rejected} rejections")
    counts = {"advisor_queries": len(ids["query"]), "proposals_accepted": int((verdicts.verdict == "accepted").sum()),
              "proposals_rejected": rejected, "proposals_invalid": int((ledger.kind == "invalid").sum()),
              "answers_timeout": int((ledger.kind == "timeout").sum()), "errors": int((ledger.kind == "error").sum())}
    differing = {key: (summary.get(key), value) for key, value in counts.items() if summary.get(key) != value}
    if differing:
        problems.append(f"summary.json counts differ from the ledger (summary, ledger): {differing}")
    return problems
