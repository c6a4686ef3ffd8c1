"""Ray jobs end to end: `hybridtrain cluster up` starts a real head node (`ray start --head`), a smoke run is
submitted through the Job Submission API with the token Ray 2.60 requires, its logs are followed to the end,
its summary is read, and `cluster down` stops exactly that head node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
PORT, DASHBOARD_PORT = 6391, 8291  # off the defaults: a developer's own cluster may hold them
DASHBOARD = f"http://127.0.0.1:{DASHBOARD_PORT}"


def _hybridtrain(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _reachable_from_the_network(head_pid: int) -> list[str]:
    """The sockets of the head node's process tree that listen (TCP) or are bound (UDP) on an address other than loopback."""
    import psutil

    from serve_llm.net import is_loopback

    head = psutil.Process(head_pid)
    tree = {head.pid} | {child.pid for child in head.children(recursive=True)}
    return sorted(f"{sock.laddr.ip}:{sock.laddr.port} (pid {sock.pid})" for sock in psutil.net_connections(kind="inet")
                  if sock.pid in tree and (sock.status == psutil.CONN_LISTEN or not sock.raddr) and sock.laddr
                  and not is_loopback(sock.laddr.ip))


@pytest.fixture()
def head_node(tmp_path, ray_local):
    """A head node started while an embedded Ray runs on the same machine (as in any test session, or beside a
    user's notebook): that Ray holds the dashboard agent's default port, which once left the head without a job agent."""
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["HOME"] = str(tmp_path / "home")  # a token of our own, and cluster up's state file, away from the user's
    token_dir = tmp_path / "home" / ".ray"
    token_dir.mkdir(parents=True)
    (token_dir / "auth_token").write_text("hybridtrain-test-token-" + os.urandom(8).hex())
    from cluster.jobs import DEFAULT_AGENT_PORT, _port_free

    agent_port_taken = not _port_free(DEFAULT_AGENT_PORT)  # normally by the embedded Ray; another Ray on the machine may hold it instead
    up = _hybridtrain("cluster", "up", "--port", str(PORT), "--dashboard-port", str(DASHBOARD_PORT), "--num-cpus", "3", env=env, timeout=360)
    try:  # whatever fails from here on, the head node is stopped (a failed check must not leave it holding the ports)
        assert up.returncode == 0, up.stdout + up.stderr
        assert "listening on 127.0.0.1 only" in up.stdout and "token auth is on" in up.stdout
        assert ("taken by another Ray" in up.stdout) == agent_port_taken, up.stdout
        head_pid = json.loads((tmp_path / "home" / ".hybridtrain" / "head.json").read_text())["pid"]
        assert _reachable_from_the_network(head_pid) == []  # GCS, raylet, object manager, agents, client server: loopback
        yield env
        assert _reachable_from_the_network(head_pid) == []  # and so are the workers the jobs started
    finally:
        down = _hybridtrain("cluster", "down", env=env, timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr
        state = tmp_path / "home" / ".hybridtrain" / "head.json"
        assert not state.exists()
        # `ray start` recorded the head for bare `ray.init()` calls to join; with the head gone, so is the record
        record = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
        assert not (record.is_file() and record.read_text().strip().endswith(f":{PORT}"))


def test_a_smoke_run_submitted_as_a_job_is_followed_to_its_end(head_node, tmp_path) -> None:
    env = head_node
    run_dir = tmp_path / "job-run"
    status = _hybridtrain("cluster", "status", "--address", f"127.0.0.1:{PORT}", env=env, timeout=120)
    assert status.returncode == 0 and "1 node(s) alive" in status.stdout and "CPUs 3" in status.stdout, status.stdout + status.stderr

    # Without the token the Jobs API refuses us (cluster trouble: exit 3), and the error says where the token is looked for.
    no_token = {**env, "HOME": str(tmp_path / "elsewhere")}
    refused = _hybridtrain("jobs", "list", "--address", DASHBOARD, env=no_token, timeout=60)
    assert refused.returncode == 3 and "~/.ray/auth_token" in refused.stderr, refused.stdout + refused.stderr

    submitted = _hybridtrain("submit", "--address", DASHBOARD, "--wait", "--", "run", "--recipe", "smoke", "--output", str(run_dir),
                             "--set", "train.epochs=2", "--set", "advisor.backend=heuristic", "--no-report", env=env, timeout=600)
    assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-2000:]
    job_id = submitted.stdout.split("submitted job ")[1].split()[0]
    assert "[hybridtrain] epoch   2/2" in submitted.stdout and f"job {job_id}: SUCCEEDED" in submitted.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["test_accuracy"] > 0.5

    listed = _hybridtrain("jobs", "list", "--address", DASHBOARD, env=env, timeout=60)
    assert job_id in listed.stdout and "SUCCEEDED" in listed.stdout
    followed = _hybridtrain("jobs", "logs", "--follow", job_id, "--address", DASHBOARD, env=env, timeout=120)
    assert followed.returncode == 0 and "test accuracy" in followed.stdout

    # Ray's own CLI, as the README shows it: the token is sent when RAY_AUTH_MODE=token is set in its environment.
    ray_cli = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", DASHBOARD, "--working-dir", str(ROOT), "--",
               "python", "-m", "cluster.cli", "run", "--recipe", "smoke", "--output", str(tmp_path / "ray-cli-run"),
               "--set", "train.epochs=1", "--set", "advisor.backend=none", "--no-report"]
    by_ray = subprocess.run(ray_cli, cwd=ROOT, env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=600)
    assert by_ray.returncode == 0 and "[hybridtrain] done: test_accuracy" in by_ray.stdout, by_ray.stdout[-3000:] + by_ray.stderr[-2000:]
    assert json.loads((tmp_path / "ray-cli-run" / "summary.json").read_text())["epochs"] == 1

    unknown = _hybridtrain("jobs", "status", "raysubmit_nope", "--address", DASHBOARD, env=env, timeout=60)
    assert unknown.returncode == 2 and "no job" in unknown.stderr  # a job id the cluster does not know: a usage error
