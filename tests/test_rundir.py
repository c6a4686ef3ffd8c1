"""cluster.rundir: one driver per directory (a lock a dead process releases), whole files, tolerant logs. No Ray."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cluster.rundir import LOCK_FILE, DirectoryInUseError, atomic_write_text, claim_directory, read_jsonl
from orchestration.errors import DataError, HybridtrainError

ROOT = Path(__file__).resolve().parents[1]

HOLDER = textwrap.dedent("""
    import sys, time
    from cluster.rundir import claim_directory
    with claim_directory(sys.argv[1], "run"):
        print("claimed", flush=True)
        time.sleep(120)
""")


def _start_holder(directory: Path) -> subprocess.Popen:
    """A second process that claims `directory` and sleeps holding it; returns once it holds it."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert holder.stdout.readline().strip() == "claimed"
    return holder


def test_a_second_process_is_refused_naming_the_directory_and_holder_then_claims_after_the_holder_is_killed(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    holder = _start_holder(run_dir)
    try:
        with pytest.raises(DirectoryInUseError) as refused:
            with claim_directory(run_dir, "run"):
                pytest.fail("claimed a directory another live process holds")
        message = str(refused.value)
        assert str(run_dir) in message and f"pid {holder.pid}" in message
        assert isinstance(refused.value, HybridtrainError) and refused.value.exit_code == 2
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up code runs: the kernel must release the lock
        holder.wait(timeout=30)
    with claim_directory(run_dir, "run") as claimed:
        assert claimed == run_dir.resolve()
        assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_claim_is_released_when_its_context_ends_and_an_empty_directory_it_created_is_removed(tmp_path: Path) -> None:
    with claim_directory(tmp_path / "new" / "deeper", "sweep"):
        assert (tmp_path / "new" / "deeper" / LOCK_FILE).is_file()
    assert not (tmp_path / "new").exists()  # refused or failed before writing anything: nothing left behind
    with claim_directory(tmp_path / "kept", "run") as directory:
        (directory / "config.yaml").write_text("name: x\n")
    with claim_directory(tmp_path / "kept", "run"):  # released: the same process claims it again
        pass
    assert (tmp_path / "kept" / "config.yaml").is_file()


def test_a_claim_in_the_same_process_is_refused_too(tmp_path: Path) -> None:
    with claim_directory(tmp_path, "run"):
        with pytest.raises(DirectoryInUseError, match=f"pid {os.getpid()}"):
            with claim_directory(tmp_path, "run"):
                pass


def test_atomic_write_replaces_whole_and_a_failed_write_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "summary.json"
    atomic_write_text(target, '{"old": 1}')
    atomic_write_text(target, '{"new": 2}')
    assert json.loads(target.read_text()) == {"new": 2}

    def full_disk(descriptor: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        atomic_write_text(target, '{"newer": 3}')
    assert json.loads(target.read_text()) == {"new": 2}  # not truncated, not half-written
    assert [path.name for path in tmp_path.iterdir()] == ["summary.json"]  # no temporary file left


def test_read_jsonl_skips_a_torn_last_line_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = tmp_path / "explores.jsonl"
    log.write_text('{"trial": "a"}\n{"trial": "b"}\n{"trial": "c", "ep')
    with caplog.at_level(logging.WARNING, logger="cluster.rundir"):
        assert read_jsonl(log) == [{"trial": "a"}, {"trial": "b"}]
    assert "torn last line 3" in caplog.text and str(log) in caplog.text
    assert read_jsonl(tmp_path / "absent.jsonl") == []


def test_read_jsonl_refuses_corruption_in_the_middle(tmp_path: Path) -> None:
    log = tmp_path / "explores.jsonl"
    log.write_text('{"trial": "a"}\n{"tri\n{"trial": "c"}\n\n')
    with pytest.raises(DataError, match=r"line 2 of 3"):
        read_jsonl(log)


def test_the_holder_stamp_is_written_only_once_the_lock_is_held(tmp_path: Path) -> None:
    holder = _start_holder(tmp_path)
    try:
        before = (tmp_path / LOCK_FILE).read_text()
        with pytest.raises(DirectoryInUseError):
            with claim_directory(tmp_path, "run"):
                pass
        assert (tmp_path / LOCK_FILE).read_text() == before  # a refused claim does not wipe the holder's stamp
    finally:
        holder.kill()
        holder.wait(timeout=30)


# ==== the claim in `hybridtrain run`, before Ray starts =============================================

@pytest.fixture()
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a command reaches `cluster.launch.connect` (Ray would start)."""
    import cluster.launch

    def no_cluster(*args, **kwargs):
        raise AssertionError("reached cluster.connect: Ray would have started")

    monkeypatch.setattr(cluster.launch, "connect", no_cluster)


@pytest.mark.parametrize("how", ["--output", "--resume"])
def test_hybridtrain_run_on_a_directory_another_driver_holds_is_refused_before_ray_starts(how: str, tmp_path: Path, no_ray: None,
                                                                                        capsys: pytest.CaptureFixture) -> None:
    from cluster.cli import main
    from cluster.experiment import build_config, write_config

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if how == "--resume":
        write_config(build_config(recipe="smoke"), run_dir / "config.yaml")
    holder = _start_holder(run_dir)
    try:
        argv = ["run", "--recipe", "smoke", "--output", str(run_dir)] if how == "--output" else ["run", "--resume", str(run_dir)]
        assert main([*argv, "--no-report"]) == 2
    finally:
        holder.kill()
        holder.wait(timeout=30)
    error = capsys.readouterr().err
    assert error.startswith("hybridtrain: error: run directory") and f"is in use by pid {holder.pid}" in error and str(run_dir) in error


def test_an_append_after_a_torn_line_starts_a_new_line(tmp_path: Path) -> None:
    from cluster.rundir import append_jsonl

    log = tmp_path / "explores.jsonl"
    append_jsonl(log, {"trial": "a"})
    with open(log, "a") as handle:
        handle.write('{"trial": "b", "ep')  # a writer that died mid-append
    append_jsonl(log, {"trial": "c"})
    assert log.read_text().splitlines() == ['{"trial": "a"}', '{"trial": "b", "ep', '{"trial": "c"}']  # c is whole, not glued onto b


def test_sweep_outputs_go_on_past_a_torn_last_line_of_explores(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from cluster.experiment import build_config
    from cluster.sweep_outputs import EXPLORES, write_sweep_outputs

    row = {"time": 1.0, "trial": "t1", "source_trial": "t0", "epoch": 2, "checkpoint": "c", "source_config": {"train.lr": 0.01},
           "config": {"train.lr": 0.02}, "source": "pbt", "run_dir": str(tmp_path / "t1" / "run-1")}
    (tmp_path / EXPLORES).write_text(json.dumps(row) + "\n" + json.dumps(row)[:25])
    with caplog.at_level(logging.WARNING, logger="cluster.rundir"):
        summary = write_sweep_outputs(build_config(recipe="smoke", sweep=True), tmp_path, [], wall_s=1.0)
    assert summary["exploits"] == 1 and "torn last line 2" in caplog.text
    assert json.loads((tmp_path / "summary.json").read_text())["exploits"] == 1


# ==== faults.disk_full: a write that runs out of disk half-way leaves the old file whole ==========

def test_an_injected_full_disk_fails_the_write_half_way_and_leaves_the_old_file(tmp_path: Path) -> None:
    import errno

    from workers.files import set_write_fault

    target = tmp_path / "metrics.csv"
    atomic_write_text(target, "epoch\n1\n")
    written: list[int] = []

    def fill(path: Path) -> bool:
        written.append(len(list(tmp_path.iterdir())))  # the temporary file is open beside the target
        return path.name == "metrics.csv"

    previous = set_write_fault(fill)
    try:
        with pytest.raises(OSError) as error:
            atomic_write_text(target, "epoch\n1\n2\n")
        atomic_write_text(tmp_path / "other.json", "{}")  # the fault picks by path
    finally:
        assert set_write_fault(previous) is fill
    assert error.value.errno == errno.ENOSPC and "injected" in str(error.value)
    assert written == [2, 2] and target.read_text() == "epoch\n1\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["metrics.csv", "other.json"]  # no temporary file left


def test_the_drivers_disk_full_points_strike_once_per_run_directory(tmp_path: Path) -> None:
    from workers.faults import DISK_FULL_MARKER, FaultConfig, driver_disk_full

    config = FaultConfig(disk_full=["summary.json", "checkpoint"])  # a YAML list; checkpoint is the workers' point
    assert config.disk_full == ("summary.json", "checkpoint")
    with driver_disk_full(config, tmp_path):
        atomic_write_text(tmp_path / "interventions.csv", "kind\n")  # not named: written
        with pytest.raises(OSError, match="No space left on device"):
            atomic_write_text(tmp_path / "summary.json", "{}")
        atomic_write_text(tmp_path / "summary.json", '{"second": 1}')  # it struck once
    assert (tmp_path / DISK_FULL_MARKER.format(point="summary.json")).exists()
    with driver_disk_full(config, tmp_path):  # a resume: the marker says it struck already
        atomic_write_text(tmp_path / "summary.json", '{"third": 1}')
    assert json.loads((tmp_path / "summary.json").read_text()) == {"third": 1}


def test_disk_full_points_and_epoch_are_checked() -> None:
    from cluster.experiment import build_config
    from orchestration.errors import ConfigError

    assert build_config(recipe="smoke", overrides=["faults.disk_full=[checkpoint, summary.json]"]).faults.disk_full == ("checkpoint", "summary.json")
    assert build_config(recipe="smoke", overrides=["faults.disk_full=model.safetensors"]).faults.disk_full == ("model.safetensors",)
    with pytest.raises(ConfigError, match=r"faults.disk_full must be a list of write points from \['checkpoint'"):
        build_config(recipe="smoke", overrides=["faults.disk_full=[config.yaml]"])
    with pytest.raises(ConfigError, match=r"faults.disk_full_epoch must be in \[1, 8\], got 9"):
        build_config(recipe="smoke", overrides=["faults.disk_full=[checkpoint]", "faults.disk_full_epoch=9"])
