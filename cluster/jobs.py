"""Ray jobs: submit a run or sweep to a cluster, watch it, stop it; start a local head node for users without one.

Everything goes through Ray's Job Submission API (`JobSubmissionClient`) at the cluster's dashboard address.
Ray 2.60 authenticates that API with a token when token auth is on (the default for a cluster started by
`ray.init()`, and for `ray start --head` when a token exists). The token is read from `RAY_AUTH_TOKEN`, the
file named by `RAY_AUTH_TOKEN_PATH`, or `~/.ray/auth_token`, in that order, and sent as `Authorization: Bearer`
on every request; it is never taken from the command line (it would show in `ps`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cluster.runtime import EMBEDDED_DEFAULTS, SINGLE_MACHINE, current_cluster_record, ensure_token, prepare_to_join, read_token
from orchestration.errors import ClusterError, JobError, UsageError
from serve_llm.net import is_loopback

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
# What a job's working directory leaves behind: environments, outputs, caches (the upload limit is 500 MiB).
EXCLUDES = [".venv", ".git", "runs", "sweeps", "**/__pycache__", "*.egg-info", ".pytest_cache", "**/*.safetensors"]
TOKEN_SOURCES = "RAY_AUTH_TOKEN, the file in RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token"
FINISHED = ("SUCCEEDED", "FAILED", "STOPPED")


def dashboard_address(address: str | None) -> str:
    """The Jobs API address: `--address`, else `RAY_ADDRESS` when it is an http(s) dashboard URL, else local."""
    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_DASHBOARD
    if address == "auto":
        address = DEFAULT_DASHBOARD
    if not address.startswith(("http://", "https://")):
        raise UsageError(f"job commands need the dashboard's HTTP address (for example {DEFAULT_DASHBOARD}), got {address!r}")
    return address.rstrip("/")


def client(address: str | None = None):
    """A connected `JobSubmissionClient` that sends the token when there is one."""
    from ray.dashboard.modules.job.sdk import JobSubmissionClient
    from ray.exceptions import AuthenticationError

    logging.getLogger("ray").setLevel(logging.WARNING)  # the SDK's packaging and websocket INFO lines
    address = dashboard_address(address)
    token = read_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as error:
        found = "the token found was refused" if token else "no token was found"
        raise JobError(f"the Ray cluster at {address} requires token authentication and {found}. hybridtrain reads the token "
                       f"from {TOKEN_SOURCES}; `ray get-auth-token` on the head node prints it.") from error
    except ConnectionError as error:
        raise JobError(f"no Ray dashboard answers at {address}: start a cluster (`hybridtrain cluster up`) or pass --address") from error


def runtime_env(pip: bool = False) -> dict[str, Any]:
    """The project as the job's working directory; with `pip`, the project's dependencies installed on the cluster
    (for a cluster whose Python lacks them: slow, and it needs a package index)."""
    env: dict[str, Any] = {"working_dir": str(PROJECT_ROOT), "excludes": EXCLUDES, "env_vars": {"HF_HUB_OFFLINE": "1"}}
    if pip:
        from importlib.metadata import requires

        dependencies = [item for item in requires("hybridtrain") or [] if "extra ==" not in item]
        env["pip"] = [item for item in dependencies if not item.startswith("torch")]  # the cluster keeps its own torch build
    return env


def submit(arguments: list[str], *, address: str | None = None, pip: bool = False) -> tuple[Any, str]:
    """Submit `hybridtrain ARGUMENTS...` (a `run` or `tune`) as a Ray job; return the client and the job id."""
    if not arguments or arguments[0] not in ("run", "tune"):
        raise UsageError("submit takes a run or tune command after --, e.g. hybridtrain submit -- run --recipe smoke")
    jobs = client(address)
    entrypoint = "python -m cluster.cli " + shlex.join(arguments)
    deadline = time.monotonic() + 180
    while True:  # a head node that has just started answers before its job agent is up
        try:
            job_id = jobs.submit_job(entrypoint=entrypoint, runtime_env=runtime_env(pip), metadata={"submitted_by": "hybridtrain"})
            return jobs, job_id
        except RuntimeError as error:
            if "No available agent" not in str(error):
                raise
            if time.monotonic() > deadline:
                raise JobError(f"the cluster at {address or 'RAY_ADDRESS'} has no job agent to run the job after 180 s: the head "
                               "node's dashboard agent did not start its HTTP service (is its port, by default 52365, "
                               "held by another Ray on that machine? see dashboard_agent.log in the head's session logs)") from error
            time.sleep(2.0)


def status(jobs, job_id: str) -> str:
    try:
        return str(jobs.get_job_status(job_id).value)
    except RuntimeError as error:
        raise UsageError(f"no job {job_id!r} on this cluster ({error})") from error


def follow(jobs, job_id: str, *, stream=None) -> str:
    """Print the job's logs as they come until it ends; return its final status."""
    stream = stream or sys.stdout
    status(jobs, job_id)  # a clear error for an unknown job

    async def tail() -> None:
        async for lines in jobs.tail_job_logs(job_id):
            stream.write(lines)
            stream.flush()

    asyncio.run(tail())
    final = status(jobs, job_id)
    while final not in FINISHED:  # the log stream can close a moment before the status settles
        time.sleep(0.5)
        final = status(jobs, job_id)
    return final


def exit_code(final_status: str) -> int:
    return 0 if final_status == "SUCCEEDED" else 1


# -- a local head node ---------------------------------------------------------------------------------------

DEFAULT_AGENT_PORT = 52365  # Ray's dashboard agent HTTP port
HEAD_STATE = Path.home() / ".hybridtrain" / "head.json"  # what `cluster up` started, for `cluster down`
LOOPBACK = "127.0.0.1"


def head_command(*, host: str, port: int, dashboard_port: int, agent_port: int, num_cpus: int | None) -> tuple[list[str], dict[str, str]]:
    """The `ray start --head --block` command line for a head node on `host`, and the environment it adds.

    A loopback `host` gives a head only this machine reaches (single-machine mode). Any other address is the node's
    address on a network, which other machines join: Ray then listens on every interface, so token auth is forced on
    (`RAY_AUTH_MODE=token`; `cluster_up` makes sure a token exists). The dashboard stays on 127.0.0.1 either way."""
    network = not is_loopback(host)
    command = ["ray", "start", "--head", "--block", f"--node-ip-address={host if network else LOOPBACK}", f"--port={port}",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", f"--dashboard-agent-listen-port={agent_port}",
               "--include-dashboard=true", "--disable-usage-stats"]
    command += [f"--num-cpus={num_cpus}"] if num_cpus else []
    return command, ({"RAY_AUTH_MODE": "token"} if network else dict(SINGLE_MACHINE))


def _check_host(host: str) -> bool:
    """Whether `host` is a network address (a loopback one is not); a wildcard or an empty host is refused."""
    if host.strip() in ("", "0.0.0.0", "::", "[::]", "*"):
        raise UsageError(f"cluster up --host takes the address other machines reach this one at, not {host!r}: for a node they "
                         "join Ray listens on every interface anyway (leave --host out for a head only this machine reaches)")
    network = not is_loopback(host)
    if network and os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        raise UsageError(f"a head node on the network address {host} needs token auth, and RAY_AUTH_MODE=disabled turns it off: "
                         "unset it (hybridtrain creates a token when none exists)")
    return network


def head_status(state: dict[str, Any]) -> str:
    """What a `head.json` record names now: "running" (the recorded `ray start` process, same start time, or its process
    group without it: a group keeps its id from reuse while it has members), "gone", or "replaced" (the pid now belongs
    to another process, which must not be signalled). A record from before start times were kept is checked by its
    command line."""
    import psutil

    pid = state.get("pid", state["pgid"])
    try:
        process = psutil.Process(pid)
        started, cmdline = process.create_time(), process.cmdline()
    except psutil.NoSuchProcess:
        return "running" if _alive(state["pgid"]) else "gone"
    except psutil.AccessDenied:  # another user's process: not ours to signal
        return "replaced"
    if "create_time" in state:
        return "running" if abs(started - state["create_time"]) < 0.01 else "replaced"
    return "running" if {"start", "--head"} <= set(cmdline) else "replaced"


def cluster_up(*, host: str = LOOPBACK, port: int = 6379, dashboard_port: int = 8265, num_cpus: int | None = None,
               timeout_s: float = 300.0) -> str:
    """`ray start --head --block` in its own process group, dashboard on 127.0.0.1, every other service on loopback
    unless `host` is a network address (then token auth is on, with a token created if none exists); wait until the
    Jobs API answers; return what to tell the user. `cluster_down` stops exactly that process group (not `ray stop`,
    which would also stop every other Ray on the machine)."""
    network = _check_host(host)
    if HEAD_STATE.is_file():
        state = json.loads(HEAD_STATE.read_text())
        if head_status(state) == "running":
            raise JobError(f"a head node started by hybridtrain is already running (dashboard {state['dashboard']}); "
                           "hybridtrain cluster down stops it")
    created = ensure_token() if network else None
    HEAD_STATE.parent.mkdir(parents=True, exist_ok=True)
    log_path = HEAD_STATE.with_suffix(".log")
    # The Jobs API hands each job to the node's dashboard agent over HTTP. Ray's agent port (52365) is held by any
    # other Ray on the machine (an embedded ray.init() included), and an agent that cannot bind it stays up with
    # its HTTP service off: every submit then fails with "No available agent". Take a free port in that case.
    agent_port = DEFAULT_AGENT_PORT if _port_free(DEFAULT_AGENT_PORT) else 0
    command, head_env = head_command(host=host, port=port, dashboard_port=dashboard_port, agent_port=agent_port, num_cpus=num_cpus)
    # Jobs on this head node run `python -m cluster.cli`: make that this environment's Python.
    env = {**EMBEDDED_DEFAULTS, **os.environ, **head_env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    # Ray gives its dashboard 60 s to come up and then fails the whole start; a loaded laptop can need more
    env.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", str(int(timeout_s)))
    with open(log_path, "w") as log:
        process = subprocess.Popen(_ray_cli(command), stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    dashboard = f"http://{LOOPBACK}:{dashboard_port}"
    address = f"{host if network else LOOPBACK}:{port}"
    HEAD_STATE.write_text(json.dumps({"pgid": process.pid, "pid": process.pid, "create_time": _create_time(process.pid),
                                      "address": address, "dashboard": dashboard}))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            HEAD_STATE.unlink(missing_ok=True)
            raise JobError(f"ray start exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        if _answers(dashboard):
            break
        time.sleep(1.0)
    else:
        cluster_down()
        raise JobError(f"the head node's dashboard did not answer within {timeout_s:.0f} s; its log: {log_path}")
    agent = "" if agent_port else f" (port {DEFAULT_AGENT_PORT} is taken by another Ray: its job agent listens on a free port)"
    return (f"[hybridtrain] head node started: address {address}, dashboard {dashboard}{agent} (log: {log_path})\n"
            f"[hybridtrain] {_auth_line(network, created)}\n"
            f"[hybridtrain] submit with: hybridtrain submit --address {dashboard} -- run --recipe smoke")


def _auth_line(network: bool, created: Path | None) -> str:
    """What `cluster up` says about who can reach the head node and whether they need the token (never the token)."""
    if network:
        made = f"a new token was written to {created}" if created else f"hybridtrain reads the token from {TOKEN_SOURCES}"
        return (f"listening on the network; token auth is on ({made}; `ray get-auth-token` prints it for the machines that "
                "join, which set RAY_AUTH_MODE=token)")
    where = "listening on 127.0.0.1 only (--host ADDRESS opens it to a network)"
    if read_token() and os.environ.get("RAY_AUTH_MODE") != "disabled":
        return f"{where}; token auth is on: hybridtrain reads the token from {TOKEN_SOURCES}"
    return f"{where}; token auth is off (no token exists; `ray get-auth-token --generate` before `cluster up` turns it on)"


def cluster_down(*, timeout_s: float = 10.0) -> bool:
    """Stop the head node `cluster_up` started (its whole process group); False when there was none. A record whose
    pid now names another process is removed and nothing is signalled (a JobError says so)."""
    if not HEAD_STATE.is_file():
        return False
    state = json.loads(HEAD_STATE.read_text())
    pgid = state["pgid"]
    status = head_status(state)
    if status == "replaced":
        HEAD_STATE.unlink(missing_ok=True)
        raise JobError(f"{HEAD_STATE} names process {state.get('pid', pgid)}, which is no longer the head node hybridtrain "
                       "started (that one ended and its pid was reused): nothing was stopped, and the stale record was removed")
    if status == "running":
        _stop_group(pgid, timeout_s)
    HEAD_STATE.unlink(missing_ok=True)
    _forget_current_cluster(state["address"])
    return True


def _stop_group(pgid: int, timeout_s: float) -> None:
    """SIGTERM the process group, SIGKILL what is left after `timeout_s`."""
    for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _alive(pgid):
            time.sleep(0.5)
        if not _alive(pgid):
            return


def _create_time(pid: int) -> float:
    import psutil

    return psutil.Process(pid).create_time()


def _forget_current_cluster(address: str) -> None:
    """`ray start` records its address in RAY_TMPDIR/ray/ray_current_cluster and a bare `ray.init()` joins the
    address recorded there; `ray stop` removes it, and so must we, or later `ray.init()` calls try to join a
    head node that is gone."""
    record = current_cluster_record()
    try:
        if record.read_text().strip().endswith(":" + address.rsplit(":", 1)[1]):
            record.unlink()
    except (OSError, IndexError):
        pass


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("", port))
        except OSError:
            return False
    return True


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _answers(dashboard: str) -> bool:
    import urllib.request

    token = read_token()
    request = urllib.request.Request(f"{dashboard}/api/version", headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status == 200
    except Exception:  # noqa: BLE001 - not up yet (refused, 401 while starting, ...)
        return False


def cluster_status(address: str | None = None) -> str:
    """Nodes, CPUs and GPUs of the cluster, read through the Jobs API's cluster connection."""
    ray_address = address or os.environ.get("RAY_ADDRESS") or _recorded_head_address() or "auto"
    if ray_address.startswith("http"):
        ray_address = "auto"
    prepare_to_join(ray_address)
    import ray

    try:
        ray.init(address=ray_address, logging_level="ERROR", log_to_driver=False)
    except ConnectionError as error:
        raise ClusterError(f"no Ray cluster to inspect at {ray_address} ({error}); `hybridtrain cluster up` starts one") from error
    try:
        nodes = [node for node in ray.nodes() if node["Alive"]]
        lines = [f"{len(nodes)} node(s) alive"]
        for node in nodes:
            resources = node["Resources"]
            lines.append(f"  {node['NodeManagerAddress']}  CPUs {resources.get('CPU', 0):g}  GPUs {resources.get('GPU', 0):g}"
                         + ("  (head)" if "node:__internal_head__" in resources else ""))
        return "\n".join(lines)
    finally:
        ray.shutdown()


def _recorded_head_address() -> str | None:
    """The GCS address of the head node `cluster up` started, while its record is there."""
    try:
        return json.loads(HEAD_STATE.read_text())["address"]
    except (OSError, ValueError, KeyError):
        return None


def _ray_cli(command: list[str]) -> list[str]:
    """`ray ...` from this Python's environment (the venv's `ray` script next to the interpreter)."""
    script = Path(sys.executable).with_name("ray")
    return [str(script), *command[1:]] if script.is_file() else command
