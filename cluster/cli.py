"""The `hybridtrain` command.

Errors meant for the user are `orchestration.errors.HybridtrainError`s: `main` prints their message and
exits with their code (2 usage and data, 1 a run or check that did not finish, 3 the cluster). Anything
else is a bug and ends in a traceback.

`-v`/`--verbose` means one thing wherever it is given (`hybridtrain -v run` or `hybridtrain run -v`):
show Ray's and the workers' own logs on the terminal (runs and sweeps; they are always kept in the run
directory) and hybridtrain's own debug messages.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from cluster.advisor_cli import register as register_advisor
from cluster.stopping import DriverStopped
from orchestration.errors import HybridtrainError, UsageError

PACKAGES = ("cluster", "orchestration", "workers", "serve_llm", "tune_search")  # whose loggers --verbose turns to debug
VERBOSE_HELP = "show Ray's and the workers' own logs on the terminal (always kept in RUN_DIR/logs/ray) and hybridtrain's debug messages"


def _add_verbose(parser: argparse.ArgumentParser, *, top_level: bool = False) -> None:
    """The one `--verbose`. On a subcommand it defaults to SUPPRESS, so that leaving it out there keeps
    a `hybridtrain -v` given before the subcommand."""
    parser.add_argument("-v", "--verbose", action="store_true", default=False if top_level else argparse.SUPPRESS, help=VERBOSE_HELP)


def _add_run(subparsers) -> None:
    run = subparsers.add_parser("run", help="train a model on Ray Train with DeepSpeed (embedded local Ray unless --address)")
    run.add_argument("--config", metavar="FILE.yaml", help="config file (YAML)")
    run.add_argument("--recipe", metavar="NAME", help="named recipe, e.g. smoke, default, zero3, mlp, resnet")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. --set train.epochs=10 (repeatable)")
    run.add_argument("--output", metavar="DIR", help="run directory (default: runs/NAME-TIMESTAMP)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its last checkpoint")
    run.add_argument("--allow-changed", action="store_true",
                     help="with --resume: go on although the run's config.yaml or data file changed since it started (what changed is printed)")
    run.add_argument("--no-report", dest="report", action="store_false", help="do not write RUN_DIR/report/report.html at the end")
    run.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    _add_verbose(run)
    run.set_defaults(func=_cmd_run)


def _resume_address(args: argparse.Namespace, what: str) -> str | None:
    """Check that `--resume` comes alone; the address that wins over the saved config's (which may name a
    cluster that is gone): --address, else RAY_ADDRESS."""
    if args.config or args.recipe or args.overrides or args.output:
        raise UsageError(f"--resume continues a {what} with its saved config.yaml; it takes no --config/--recipe/--set/--output")
    return args.address or os.environ.get("RAY_ADDRESS")


def _config_and_dir(args: argparse.Namespace, *, sweep: bool, root: str):
    """The config from --recipe/--config/--set/--address, and --output or `root/NAME-TIMESTAMP`."""
    from cluster.experiment import build_config

    overrides = list(args.overrides) + ([f"cluster.address={args.address}"] if args.address else [])
    overrides += ["cluster.verbose=true"] if args.verbose else []
    config = build_config(recipe=args.recipe, config_file=args.config, overrides=overrides, sweep=sweep)
    return config, Path(args.output) if args.output else Path(root) / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _cmd_run(args: argparse.Namespace) -> int:
    from cluster.launch import run_experiment
    from cluster.stopping import check_stop, record_stop, set_phase, stop_on_sigterm

    with stop_on_sigterm():  # SIGTERM: stop cleanly, leave the run resumable (`cluster.stopping`); `main` prints the line
        # run_experiment claims the directory before Ray starts: a second `run --output X`, or a retried
        # --resume while the first lives, is refused.
        if args.resume:
            run_dir, address = Path(args.resume), _resume_address(args, "run")
            run_experiment(None, run_dir, resume=True, address=address, allow_changed=args.allow_changed)
        else:
            if args.allow_changed:
                raise UsageError("--allow-changed goes with --resume: a new run has nothing to have changed")
            config, run_dir = _config_and_dir(args, sweep=False, root="runs")
            run_experiment(config, run_dir)
        if args.report:
            set_phase("the report")
            _report(run_dir)
            try:
                check_stop()
            except DriverStopped as stop:  # the run had finished and its report is written: say so, and stop
                record_stop(run_dir, stop)
                raise
    return 0


def _report(directory: Path) -> None:
    """The run's or sweep's report; a report that cannot be drawn costs a warning, not the run."""
    from cluster.report import write_report

    try:
        print(f"[hybridtrain] report: {write_report(directory)}", flush=True)
    except Exception as error:  # noqa: BLE001 - the training result is already safe on disk
        print(f"[hybridtrain] warning: could not write the report ({type(error).__name__}: {error}); "
              f"try again with: hybridtrain report {directory}", flush=True)


def _add_tune(subparsers) -> None:
    tune = subparsers.add_parser("tune", help="run a Ray Tune sweep (PBT, PB2, ASHA or random search) whose trials are full runs")
    tune.add_argument("--config", metavar="FILE.yaml", help="config file (YAML) with a tune: section")
    tune.add_argument("--recipe", metavar="NAME", help="named sweep recipe, e.g. smoke, default")
    tune.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config key, e.g. --set tune.scheduler=asha (repeatable)")
    tune.add_argument("--output", metavar="DIR", help="sweep directory (default: sweeps/NAME-TIMESTAMP)")
    tune.add_argument("--resume", metavar="SWEEP_DIR", help="continue an interrupted sweep; finished trials are not run again")
    tune.add_argument("--allow-changed", action="store_true",
                      help="with --resume: go on although the sweep's config.yaml (tune.* included) or data file changed since it started (what changed is printed)")
    tune.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    tune.add_argument("--no-report", dest="report", action="store_false", help="do not write SWEEP_DIR/report/report.html at the end")
    _add_verbose(tune)
    tune.set_defaults(func=_cmd_tune)


def _cmd_tune(args: argparse.Namespace) -> int:
    from cluster.sweep import run_sweep

    if args.resume:
        sweep_dir = Path(args.resume)
        summary = run_sweep(None, args.resume, resume=True, address=_resume_address(args, "sweep"), allow_changed=args.allow_changed)
    else:
        if args.allow_changed:
            raise UsageError("--allow-changed goes with --resume: a new sweep has nothing to have changed")
        config, sweep_dir = _config_and_dir(args, sweep=True, root="sweeps")
        summary = run_sweep(config, sweep_dir)
    if args.report:
        _report(sweep_dir)
    if summary["trials"] and len(summary["trials_failed"]) == summary["trials"]:
        print("hybridtrain: every trial failed; see the warnings above", file=sys.stderr)
        return 1
    return 0


def _add_predict(subparsers) -> None:
    predict = subparsers.add_parser("predict", help="predict with a finished run's model")
    predict.add_argument("run_dir", metavar="RUN_DIR")
    predict.add_argument("input", metavar="INPUT.npz", help=".npz with array x shaped like the training samples")
    predict.add_argument("--output", metavar="FILE.npz")
    predict.set_defaults(func=_cmd_predict)


def _cmd_predict(args: argparse.Namespace) -> int:
    from cluster.predict import predict_file

    predict_file(args.run_dir, args.input, args.output)
    return 0


def _add_export(subparsers) -> None:
    export = subparsers.add_parser("export", help="export a finished run's model to ONNX, checked with onnxruntime against PyTorch")
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("--out", metavar="PATH", help="the .onnx file (default: RUN_DIR/model.onnx); the check's figures go to PATH.json")
    export.add_argument("--opset", type=int, metavar="N", help="ONNX opset, 18 or later (default: the exporter's)")
    export.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from cluster.export import export_onnx

    result = export_onnx(args.run_dir, args.out, opset=args.opset)  # a VerificationError exits 1 through main
    check = result.comparison
    print(f"[hybridtrain] ONNX model (opset {result.opset}) -> {result.path}  (onnxruntime vs PyTorch on {check.samples} inputs, {result.inputs}: "
          f"max |logit difference| {check.max_abs_diff:.2g} <= {check.tolerance:.2g}, argmax agreement {check.agreement:.0%})", flush=True)
    return 0


def _add_report(subparsers) -> None:
    report = subparsers.add_parser("report", help="write an HTML report (plots embedded) and PNGs for a run or sweep directory")
    report.add_argument("directory", metavar="RUN_OR_SWEEP_DIR")
    report.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from cluster.report import write_report

    print(write_report(args.directory))
    return 0


def _add_audit(subparsers) -> None:
    audit = subparsers.add_parser("audit", help="check a finished run for loss: every epoch once, a consistent ledger, counts, a model that loads")
    audit.add_argument("run_dir", metavar="RUN_DIR")
    audit.set_defaults(func=_cmd_audit)


def _cmd_audit(args: argparse.Namespace) -> int:
    from cluster.audit import audit_run

    problems = audit_run(args.run_dir)
    for problem in problems:
        print(f"[hybridtrain] audit: {problem}")
    print(f"[hybridtrain] audit of {args.run_dir}: " + ("nothing lost" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


def _add_grafana(subparsers) -> None:
    grafana = subparsers.add_parser("grafana", help="print (or write) the Grafana dashboard for hybridtrain's live metrics")
    grafana.add_argument("--output", metavar="FILE.json", help="write it here instead of printing it")
    grafana.set_defaults(func=_cmd_grafana)


def _cmd_grafana(args: argparse.Namespace) -> int:
    from orchestration.telemetry import grafana_dashboard

    text = json.dumps(grafana_dashboard(), indent=1) + "\n"
    if args.output:
        try:
            Path(args.output).write_text(text)
        except OSError as error:
            raise UsageError(f"--output {args.output}: cannot write it ({error.strerror or error})") from error
        print(f"[hybridtrain] Grafana dashboard written to {args.output}: import it next to Ray's own dashboards")
    else:
        print(text, end="")
    return 0


def _add_jobs(subparsers) -> None:
    submit = subparsers.add_parser("submit", help="submit a run or sweep as a Ray job: hybridtrain submit [--wait] -- run --recipe smoke")
    submit.add_argument("--address", help="the cluster's dashboard URL (default: RAY_ADDRESS if it is one, else http://127.0.0.1:8265)")
    submit.add_argument("--wait", action="store_true", help="follow the job's logs until it ends; exit with its status")
    submit.add_argument("--pip", action="store_true", help="install the project's dependencies on the cluster (a cluster whose Python lacks them)")
    submit.add_argument("arguments", nargs=argparse.REMAINDER, metavar="-- run|tune ARGS")
    submit.set_defaults(func=_cmd_submit)
    jobs = subparsers.add_parser("jobs", help="list, inspect, follow or stop Ray jobs")
    actions = jobs.add_subparsers(dest="action", required=True)
    for action, text in (("list", "every job of the cluster"), ("status", "one job's status"), ("logs", "one job's logs"), ("stop", "stop a job")):
        command = actions.add_parser(action, help=text)
        if action != "list":
            command.add_argument("job_id", metavar="JOB_ID")
        if action == "logs":
            command.add_argument("--follow", action="store_true", help="follow until the job ends; exit with its status")
        command.add_argument("--address", help="the cluster's dashboard URL")
        command.set_defaults(func=_cmd_jobs)
    cluster = subparsers.add_parser("cluster", help="start, stop or inspect a local Ray head node")
    cluster.add_argument("action", choices=["up", "down", "status"])
    cluster.add_argument("--host", default="127.0.0.1", metavar="ADDRESS",
                         help="up: this node's address on a network for other machines to join (turns token auth on, creating "
                              "a token if none exists); default 127.0.0.1: every Ray service listens on loopback only")
    cluster.add_argument("--port", type=int, default=6379, help="up: the GCS port")
    cluster.add_argument("--dashboard-port", type=int, default=8265, help="up: the dashboard port (bound to 127.0.0.1)")
    cluster.add_argument("--num-cpus", type=int, help="up: CPUs to advertise")
    cluster.add_argument("--address", help="status: the cluster's address")
    cluster.set_defaults(func=_cmd_cluster)


def _cmd_submit(args: argparse.Namespace) -> int:
    from cluster import jobs

    arguments = args.arguments[1:] if args.arguments[:1] == ["--"] else args.arguments
    client, job_id = jobs.submit(arguments, address=args.address, pip=args.pip)
    address = jobs.dashboard_address(args.address)
    print(f"[hybridtrain] submitted job {job_id}\n[hybridtrain] dashboard: {address}/#/jobs/{job_id}\n"
          f"[hybridtrain] follow it with: hybridtrain jobs logs --follow {job_id}" + (f" --address {args.address}" if args.address else ""), flush=True)
    if not args.wait:
        return 0
    final = jobs.follow(client, job_id)
    print(f"[hybridtrain] job {job_id}: {final}", flush=True)
    return jobs.exit_code(final)


def _cmd_jobs(args: argparse.Namespace) -> int:
    from cluster import jobs

    client = jobs.client(args.address)
    if args.action == "list":
        for job in sorted(client.list_jobs(), key=lambda job: job.start_time or 0):
            print(f"{job.submission_id or job.job_id}  {job.status.value:<9}  {job.entrypoint}")
        return 0
    if args.action == "status":
        print(jobs.status(client, args.job_id))
    elif args.action == "logs" and args.follow:
        final = jobs.follow(client, args.job_id)
        print(f"[hybridtrain] job {args.job_id}: {final}", flush=True)
        return jobs.exit_code(final)
    elif args.action == "logs":
        jobs.status(client, args.job_id)
        print(client.get_job_logs(args.job_id), end="")
    else:
        stopped = client.stop_job(args.job_id)
        print(f"[hybridtrain] job {args.job_id}: " + ("stop requested" if stopped else "already finished"))
    return 0


def _cmd_cluster(args: argparse.Namespace) -> int:
    from cluster import jobs

    if args.action == "up":
        print(jobs.cluster_up(host=args.host, port=args.port, dashboard_port=args.dashboard_port, num_cpus=args.num_cpus))
    elif args.action == "down":
        if not jobs.cluster_down():
            print("[hybridtrain] no head node started by `hybridtrain cluster up` is running (`ray stop` stops every Ray on this machine)")
            return 1
        print("[hybridtrain] head node stopped")
    else:
        print(jobs.cluster_status(args.address))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybridtrain", description="LLM-advised training on Ray Train with DeepSpeed ZeRO")
    _add_verbose(parser, top_level=True)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_run(subparsers)
    _add_tune(subparsers)
    _add_predict(subparsers)
    _add_export(subparsers)
    _add_report(subparsers)
    _add_audit(subparsers)
    _add_grafana(subparsers)
    _add_jobs(subparsers)
    register_advisor(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub at run time
    args = build_parser().parse_args(argv)
    if args.command in ("run", "tune", "cluster") and (getattr(args, "address", None) or os.environ.get("RAY_ADDRESS") or args.command == "cluster"):
        from cluster.runtime import prepare_to_join

        prepare_to_join(getattr(args, "address", None) or os.environ.get("RAY_ADDRESS"))  # joining a cluster: before anything imports Ray
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:  # ours only: other libraries' debug output (matplotlib, urllib3, filelock) is noise here
        for package in PACKAGES:
            logging.getLogger(package).setLevel(logging.DEBUG)
    try:
        return args.func(args)
    except HybridtrainError as error:  # the user's input, a run that did not finish, or the cluster: not a bug
        print(f"hybridtrain: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("hybridtrain: interrupted", file=sys.stderr)
        return 130
    except DriverStopped as stop:  # SIGTERM of a run: stopped cleanly (`cluster.stopping`); the message says what to do
        print(f"hybridtrain: {stop}", file=sys.stderr)
        return stop.exit_code


if __name__ == "__main__":
    sys.exit(main())
