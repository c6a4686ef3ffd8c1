"""A sweep directory's result files: `results.csv` (one row per trial), `explores.csv` (every start from
another trial's checkpoint, with what chose its config and the score it reached) and `summary.json`.

Each is written whole (`cluster.rundir.atomic_write_text`); the append-only logs the trials and the
explorer write (`explores.jsonl`, `explore_decisions.jsonl`, appended from several nodes) are read
with `read_jsonl`, so a torn last line (a writer that died mid-append) is skipped and said, not fatal.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from cluster.experiment import ExperimentConfig
from cluster.rundir import UnreadableFileError, atomic_write_text, read_json, read_jsonl

logger = logging.getLogger(__name__)

EXPLORES = "explores.jsonl"  # written by trials: every start from another trial's checkpoint
EXPLORE_DECISIONS = "explore_decisions.jsonl"  # written by the LLM explorer: every explore it decided


def write_sweep_outputs(config: ExperimentConfig, sweep_dir: Path, results, *, wall_s: float,
                        coordinator: dict[str, Any] | None = None) -> dict[str, Any]:
    """`results.csv` (one row per trial), `explores.csv` (exploit/explore decisions) and `summary.json`."""
    import pandas as pd

    metric, mode = config.tune.metric, config.tune.mode
    sign = 1.0 if mode == "max" else -1.0
    rows = [_trial_row(result, metric, mode) for result in results]
    frame = pd.DataFrame(rows)
    atomic_write_text(sweep_dir / "results.csv", frame.to_csv(index=False))
    explores = _explores(sweep_dir, metric, config.tune.perturbation_interval)
    atomic_write_text(sweep_dir / "explores.csv", explores.to_csv(index=False))
    finished = [row for row in rows if row["status"] == "finished" and row["last_score"] is not None]
    candidates = finished or [row for row in rows if row["last_score"] is not None]
    best = max(candidates, key=lambda row: sign * row["last_score"]) if candidates else None
    summary = {
        "name": config.name,
        "scheduler": config.tune.scheduler,
        "metric": metric,
        "mode": mode,
        "best_score": None if best is None else best["last_score"],
        "best_test_accuracy": None if best is None else best["test_accuracy"],
        "best_config": None if best is None else {k.removeprefix("config/"): v for k, v in best.items() if k.startswith("config/")},
        "best_run_dir": None if best is None else best["run_dir"],
        "trials": len(rows),
        "trials_finished": len(finished),
        "trials_failed": {row["trial"]: row["error"] for row in rows if row["status"] == "error"},  # trial -> what went wrong
        "exploits": int(len(explores)),
        "llm_explores": int((explores.source == "llm").sum()) if len(explores) else 0,
        "fallbacks": int((explores.source == "fallback").sum()) if len(explores) else 0,
        "explore_decisions": count_lines(sweep_dir / EXPLORE_DECISIONS),
        "coordinator": coordinator,  # the shared coordinator: runs served, response-cache hits (shared: across runs)
        "wall_s": wall_s,
    }
    atomic_write_text(sweep_dir / "summary.json", json.dumps(summary, indent=2, default=str))  # last: the sweep's outputs are complete
    return summary


def _trial_row(result, metric: str, mode: str) -> dict[str, Any]:
    """One trial's row of `results.csv`, from its Tune result and its runs' `summary.json`."""
    import pandas as pd

    history = result.metrics_dataframe if result.metrics_dataframe is not None else pd.DataFrame()
    scores = history[metric].dropna() if metric in history else pd.Series(dtype=float)
    last = result.metrics or {}
    run_dir = last.get("run_dir")
    # The run that finished may have trained no epoch of its own (restarted at the last epoch), so look
    # through all of the trial's runs, newest first.
    finals = sorted(Path(run_dir).parent.glob("run-*/summary.json"), key=lambda path: int(path.parent.name[4:])) if run_dir else []
    summary_file, final = _newest_readable(finals)
    finished = summary_file is not None
    run_dir = str(summary_file.parent) if finished else run_dir
    error = _first_line(result.error) if result.error else None
    row = {"trial": Path(result.path).name, "status": "error" if result.error else ("finished" if finished else "stopped"), "error": error,
           "best_score": float(scores.max() if mode == "max" else scores.min()) if len(scores) else None,
           "last_score": last.get(metric), "epochs": last.get("epoch"), "run_dir": run_dir,
           "test_accuracy": final["test_accuracy"] if finished else None}
    row.update({f"config/{key}": value for key, value in (result.config or {}).items()})
    return row


def _newest_readable(summaries: list[Path]) -> tuple[Path | None, dict[str, Any] | None]:
    """The newest of a trial's runs' `summary.json` that reads whole; a torn one (its run died writing it) is skipped, and said."""
    for path in reversed(summaries):
        try:
            return path, read_json(path)
        except UnreadableFileError as error:
            logger.warning("%s; that run counts as not finished", error)
    return None, None


def _explores(sweep_dir: Path, metric: str, interval: int):
    """The decisions log, with each exploited trial's score one perturbation interval later."""
    import pandas as pd

    rows, decisions = read_jsonl(sweep_dir / EXPLORES), read_jsonl(sweep_dir / EXPLORE_DECISIONS)
    for row in rows:
        # Which explore produced this trial's config: the LLM's proposal, or PBT's perturbation after a fallback.
        match = next((d for d in reversed(decisions) if d["config"] == {k: row["config"].get(k) for k in d["config"]}), None)
        row["source"] = match["source"] if match else "pbt"
        row["proposal"] = match["proposal"] if match else None
        row["problem"] = match["problem"] if match else None
        row["score_after"] = None
        metrics_file = Path(row["run_dir"]) / "metrics.csv"
        if metrics_file.is_file():
            frame = pd.read_csv(metrics_file)
            later = frame[frame.epoch >= row["epoch"] + interval]
            if metric in frame and len(later):
                row["score_after"] = float(later[metric].iloc[0])
        row["source_config"] = json.dumps(row["source_config"])
        row["config"] = json.dumps(row["config"])
    columns = ["time", "trial", "source_trial", "epoch", "source", "proposal", "problem", "source_config", "config", "score_after", "run_dir",
               "checkpoint"]
    return pd.DataFrame(rows, columns=columns)


def _first_line(error: BaseException) -> str:
    """`Type: message` of the error a trial died of, unwrapped from Ray's task error, first line only."""
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"[:300]


def count_lines(path: Path) -> int:
    """Non-blank lines of a JSON-lines log (0 when it is not there yet): a cheap count for live telemetry, never parsed."""
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0
