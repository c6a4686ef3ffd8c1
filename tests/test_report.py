"""`hybridtrain report`: the HTML report of a run, drawn from the files a run writes, and rendered in a real
headless Chromium (Debian's `chromium`; `dev.sh test` installs it where it can)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cluster.report import ReportError, write_report
from orchestration.ledger import InterventionRecord, Ledger

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--enable-logging=stderr", "--v=0"]
ACCEPTED_GREEN = (0x2C, 0xA0, 0x2C)  # the accepted-proposal marker and reward bar


def _run_dir(path: Path) -> Path:
    """The files of a 6-epoch advised run: one proposal accepted, one rejected, one invalid answer, a cache hit."""
    path.mkdir()
    epochs = np.arange(1, 7)
    pd.DataFrame({"epoch": epochs, "train_loss": 2.0 / epochs, "val_loss": 2.1 / epochs, "val_accuracy": 1 - 0.5 / epochs,
                  "lr": 3e-3, "samples_per_s": 5000.0, "wall_s": epochs * 1.5, "probation_s": np.minimum(epochs, 3) * 0.4}).to_csv(path / "metrics.csv", index=False)
    ledger = Ledger()
    for epoch, verdict, reward in ((2, "accepted", 0.12), (4, "rejected", -0.3)):
        query = f"r:q{epoch}"
        ledger.append(InterventionRecord(kind="query", epoch=epoch, query_id=query))
        ledger.append(InterventionRecord(kind="proposal", epoch=epoch, query_id=query, proposal_summary="shrink(fc,0.1)", latency_s=1.2 * epoch,
                                         alphas_json=json.dumps({"fc.weight": 0.1 * epoch, "conv.weight": 0.05 * epoch}), status="valid"))
        ledger.append(InterventionRecord(kind="verdict", epoch=epoch, query_id=query, reward=reward, verdict=verdict, reason="reward ..."))
    ledger.append(InterventionRecord(kind="cache_hit", epoch=5, query_id="r:q5"))
    ledger.append(InterventionRecord(kind="invalid", epoch=6, query_id="r:q6", reason="lr_scale 40 outside [0.1, 10]"))
    ledger.write_csv(path / "interventions.csv")
    (path / "summary.json").write_text(json.dumps({"test_accuracy": 0.97, "epochs": 6, "proposals_accepted": 1, "proposals_rejected": 1}))
    return path


def test_a_run_report_embeds_every_plot_and_writes_them_as_pngs(tmp_path) -> None:
    page = write_report(_run_dir(tmp_path / "run"))
    text = page.read_text()
    pngs = sorted(path.stem for path in page.parent.glob("*.png"))
    assert pngs == ["advisor", "alphas", "learning_curves", "probation", "rewards"]
    assert text.count("data:image/png;base64,") == len(pngs) and "<script" not in text and "http" not in text.split("<body>")[1]
    for name in pngs:  # no blank plot
        pixels = np.asarray(Image.open(page.parent / f"{name}.png").convert("L"), dtype=float)
        assert pixels.std() > 5, name
    assert "Proposals judged on probation" in text and "accepted" in text and "rejected" in text


def test_report_of_a_directory_that_is_not_a_run_says_so(tmp_path) -> None:
    with pytest.raises(ReportError, match="not a run directory"):
        write_report(tmp_path)


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail("headless Chromium is needed for the report test: install Debian's package (apt-get install chromium); "
                    "bash dev.sh test installs it where it can")
    return found


def _render(url: str, tmp_path: Path, name: str) -> tuple[np.ndarray, str]:
    shot = tmp_path / f"{name}.png"
    done = subprocess.run([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / (name + '-profile')}", "--window-size=1200,2600",
                           f"--screenshot={shot}", url], capture_output=True, text=True, timeout=120)
    assert shot.is_file(), done.stderr[-3000:]
    return np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("RGB")), done.stderr


def test_the_report_renders_in_headless_chromium_with_its_plots_and_no_console_errors(tmp_path) -> None:
    page = write_report(_run_dir(tmp_path / "run"))
    screenshot, log = _render(page.as_uri(), tmp_path, "report")
    assert "CONSOLE" not in log, [line for line in log.splitlines() if "CONSOLE" in line]
    assert screenshot.std() > 20  # not a blank page
    # the plots were decoded and painted: the accepted marker's green is on screen
    assert (np.abs(screenshot.astype(int) - ACCEPTED_GREEN).sum(axis=2) < 30).sum() > 50
    # the console check can fail: a page that logs an error is caught
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><script>console.error("boom")</script></body></html>')
    _, bad_log = _render(bad.as_uri(), tmp_path, "bad")
    assert "CONSOLE" in bad_log and "boom" in bad_log


@pytest.mark.parametrize("torn", ["", '{"test_accuracy": 0.9'])
def test_a_torn_summary_is_a_clear_error_for_report_and_a_problem_for_audit(tmp_path, torn: str) -> None:
    """A full disk or a kill while summary.json was written (before it was written whole) must not crash either command."""
    from cluster.audit import audit_run

    run_dir = _run_dir(tmp_path / "run")
    (run_dir / "summary.json").write_text(torn)
    with pytest.raises(ReportError, match=r"summary.json cannot be read: .*hybridtrain run --resume"):
        write_report(run_dir)
    (run_dir / "config.yaml").write_text("name: torn\n")
    [problem] = audit_run(run_dir)
    assert "summary.json cannot be read" in problem and ("empty (0 bytes)" in problem) == (torn == "") and "--resume" in problem


def test_a_run_with_lr_find_shows_its_curve_and_choice(tmp_path) -> None:
    from workers.lr_find import choose, exponential_lrs, write_result

    run_dir = _run_dir(tmp_path / "run")
    lrs = exponential_lrs(40)
    result = choose(lrs, [2.3 - 0.05 * i for i in range(40)], fallback_lr=3e-3, planned=40)
    write_result(run_dir, result)
    summary = json.loads((run_dir / "summary.json").read_text()) | {"lr_find": result.record()}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    page = write_report(run_dir).read_text()
    assert "LR range test" in page and (run_dir / "report" / "lr_find.png").is_file()
    assert "lr_found" in page
