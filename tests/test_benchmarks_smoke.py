"""The evidence benchmarks run from one command each: their smoke versions, end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, out: Path, *extra: str) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--out", str(out), *extra], cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_advice_bench_smoke_measures_states_from_real_runs(tmp_path) -> None:
    stdout = run("advice_bench.py", tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert {row["advisor"] for row in rows} == {"heuristic", "random"} and len(rows) == 10
    assert {row["condition"] for row in rows} == {"healthy", "lr_high", "lr_low", "overfit", "dead"}
    # every state was read by the coordinator's diagnosis, and every applied proposal was judged on the real state
    assert all(row["findings"] for row in rows)
    assert all(row["reward"] == 0.0 for row in rows if row["action"] == "keep")
    assert "| heuristic | 5 |" in stdout and "| random | 5 |" in stdout and (tmp_path / "table.md").is_file()


@pytest.mark.e2e
def test_compare_smoke_runs_real_runs_per_method(tmp_path) -> None:
    stdout = run("compare.py", tmp_path)
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["method"], r["condition"]) for r in records] == [("static", "hard"), ("heuristic", "hard")]
    assert all(0.0 <= r["test"] <= 1.0 and r["wall_s"] > 0 for r in records)
    assert records[0]["queries"] == 0 and records[1]["queries"] >= 1  # the heuristic advisor was really asked
    for method in ("static", "heuristic"):
        assert (tmp_path / f"digits-hard-{method}-0" / "summary.json").is_file()
    assert "logistic regression (scikit-learn, same splits)" in stdout and (tmp_path / "accuracy.svg").read_text().startswith("<svg")
