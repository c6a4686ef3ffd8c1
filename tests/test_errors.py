"""One exception family (issue 22): every error meant for the user is a `HybridtrainError`, `hybridtrain`
exits with its code, and anything else (a bug) ends in a traceback instead of passing for the user's mistake.

No Ray is started: `cluster.launch.connect` is replaced by a stub that fails the test if a command gets
that far, and the one cluster error comes from a stubbed `ray.init`.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import logging
import sys
from pathlib import Path

import numpy as np
import pytest

from cluster.cli import PACKAGES, build_parser, main
from orchestration import errors
from orchestration.errors import HybridtrainError

ROOT = Path(__file__).resolve().parents[1]

# Exception classes that are not part of the family, each with the reason it never reaches the user.
OUTSIDE_THE_FAMILY = {
    "serve_llm.validate._Rejected": "private to the validator: caught in the same module and turned into a 'rejected' AdvisorResponse",
    "cluster.stopping.DriverStopped": "a stop signal, not an error: a BaseException as KeyboardInterrupt is, so no `except Exception` swallows it; "
                                      "`main` prints its line and exits 128 + the signal",
}


def _exception_classes() -> list[tuple[str, str]]:
    """(module, class) of every class in the project that derives, directly or through other project
    classes, from a builtin exception; read from the source, so a new module cannot be missed."""
    builtin = {name for name, value in vars(builtins).items() if isinstance(value, type) and issubclass(value, BaseException)}
    classes: dict[str, tuple[str, list[str]]] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.ClassDef):
                    bases = [base.id if isinstance(base, ast.Name) else getattr(base, "attr", "") for base in node.bases]
                    classes[f"{module}.{node.name}"] = (node.name, bases)
    exception_names = set(builtin)
    grew = True
    while grew:  # project exceptions derived from project exceptions
        found = {name for name, bases in classes.values() if set(bases) & exception_names}
        grew = not found <= exception_names
        exception_names |= found
    return sorted((qualified.rsplit(".", 1)[0], name) for qualified, (name, bases) in classes.items() if set(bases) & exception_names)


def test_every_exception_class_of_the_project_is_a_hybridtrain_error() -> None:
    found = _exception_classes()
    assert ("orchestration.errors", "ConfigError") in found and ("serve_llm.validate", "_Rejected") in found  # the walk sees both kinds
    outside = []
    for module, name in found:
        cls = getattr(importlib.import_module(module), name)
        if not issubclass(cls, HybridtrainError) and f"{module}.{name}" not in OUTSIDE_THE_FAMILY:
            outside.append(f"{module}.{name}")
    assert outside == [], f"exception classes outside HybridtrainError (derive from it, or list them with a reason): {outside}"
    assert not set(OUTSIDE_THE_FAMILY) - {f"{module}.{name}" for module, name in found}, "a listed exception no longer exists"


def test_the_rejected_answer_never_leaves_the_validator() -> None:
    """The one listed exception: the validator turns it into a 'rejected' response; no other module names it."""
    from orchestration.protocol import TrainingSnapshot
    from serve_llm.validate import validate_proposal

    response = validate_proposal("{not json", TrainingSnapshot(epoch=3))
    assert response.status == "rejected" and any("malformed JSON" in problem for problem in response.problems)
    for path in ROOT.glob("*/*.py"):
        if path.parts[-2] in PACKAGES and path.name != "validate.py":
            assert "_Rejected" not in path.read_text(), path


@pytest.mark.parametrize(("module", "name", "builtin"), [
    ("orchestration.settings", "ConfigError", ValueError),
    ("cluster.experiment", "ConfigError", ValueError),
    ("workers.data", "DataError", ValueError),
    ("cluster.report", "ReportError", ValueError),
    ("cluster.export", "ExportError", ValueError),
    ("cluster.export", "VerificationError", RuntimeError),
    ("cluster.launch", "RunError", RuntimeError),
    ("cluster.jobs", "JobError", RuntimeError),
    ("workers.checkpoints", "CheckpointError", RuntimeError),
])
def test_the_old_names_still_import_and_keep_their_builtin_base(module: str, name: str, builtin: type) -> None:
    cls = getattr(importlib.import_module(module), name)
    assert cls is getattr(errors, name) and issubclass(cls, builtin)


def test_the_exit_codes_follow_the_documented_rule() -> None:
    usage = [errors.UsageError, errors.NotFoundError, errors.ConfigError, errors.DataError, errors.ReportError, errors.ExportError]
    assert {cls.exit_code for cls in usage} == {2}
    assert {cls.exit_code for cls in (errors.RunError, errors.CheckpointError, errors.VerificationError)} == {1}
    assert errors.ClusterError.exit_code == errors.JobError.exit_code == 3
    assert issubclass(errors.NotFoundError, FileNotFoundError)


# ==== bad input through `hybridtrain`, in-process, without Ray ===================================

@pytest.fixture()
def no_ray(monkeypatch: pytest.MonkeyPatch):
    """Fail the test if a command reaches `cluster.launch.connect` (Ray would start)."""
    import cluster.launch

    def no_cluster(*args, **kwargs):
        raise AssertionError("bad input reached cluster.connect: Ray would have started")

    monkeypatch.setattr(cluster.launch, "connect", no_cluster)


def _bad_yaml(tmp_path: Path) -> list[str]:
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    return ["run", "--config", str(tmp_path / "bad.yaml")]


def _a_run_dir_finished(tmp_path: Path) -> list[str]:
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "config.yaml").write_text("name: done\n")
    (tmp_path / "done" / "summary.json").write_text("{}")
    return ["run", "--resume", str(tmp_path / "done")]


def _predict_input(tmp_path: Path) -> Path:
    np.savez(tmp_path / "in.npz", x=np.zeros((2, 4), dtype=np.float32))
    return tmp_path / "in.npz"


BAD_INPUTS = {
    "bad --set key": (lambda tmp: ["run", "--set", "train.nope=1"], "unknown config key(s) ['train.nope']"),
    "bad --set value": (lambda tmp: ["run", "--set", "train.epochs=0"], "train.epochs"),
    "--set without =": (lambda tmp: ["run", "--set", "train.epochs"], "--set expects key=value"),
    "missing config file": (lambda tmp: ["run", "--config", str(tmp / "missing.yaml")], "missing.yaml' does not exist"),
    "invalid YAML": (_bad_yaml, "is not valid YAML"),
    "unknown recipe": (lambda tmp: ["run", "--recipe", "huge"], "unknown recipe 'huge'"),
    "bad data path": (lambda tmp: ["run", "--set", "data.path=/nonexistent/data.npz"], "data.path '/nonexistent/data.npz' does not exist"),
    "missing pretrained weights": (lambda tmp: ["run", "--set", f"model.pretrained={tmp}/nope"], "model.pretrained: no model weights"),
    "--resume of a non-run directory": (lambda tmp: ["run", "--resume", str(tmp)], "not a run directory (no config.yaml)"),
    "--resume of a finished run": (_a_run_dir_finished, "the run already finished"),
    "--resume with --set": (lambda tmp: ["run", "--resume", str(tmp), "--set", "train.epochs=2"], "--resume continues a run"),
    "report of a missing directory": (lambda tmp: ["report", str(tmp / "gone")], "is not a run directory (no metrics.csv)"),
    "audit of a missing directory": (lambda tmp: ["audit", str(tmp / "gone")], "gone' is not a run directory (no config.yaml)"),
    "predict with a missing run directory": (lambda tmp: ["predict", str(tmp / "gone"), str(_predict_input(tmp))],
                                             "model.safetensors not found: is"),
    "predict of a missing input": (lambda tmp: ["predict", str(tmp), str(tmp / "none.npz")], "none.npz does not exist"),
    "grafana into a missing folder": (lambda tmp: ["grafana", "--output", str(tmp / "no" / "such" / "dash.json")], "cannot write it"),
    "submit without a command": (lambda tmp: ["submit", "--address", "http://127.0.0.1:9", "--", "predict"], "submit takes a run or tune command"),
    "jobs at a non-HTTP address": (lambda tmp: ["jobs", "list", "--address", "127.0.0.1:6379"], "the dashboard's HTTP address"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_naming_the_problem(case: str, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                            no_ray: None) -> None:
    make_argv, message = BAD_INPUTS[case]
    argv = make_argv(tmp_path)
    if argv[0] == "run" and "--resume" not in argv:
        argv += ["--output", str(tmp_path / "out")]
    ray_was_up = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hybridtrain: error: ") and message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing written
    assert ("ray" in sys.modules and sys.modules["ray"].is_initialized()) == ray_was_up  # and no Ray started


def test_no_ray_at_the_address_is_cluster_trouble_exit_3(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    import cluster.runtime

    def refused(*args, **kwargs):
        raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:9")

    monkeypatch.setattr(cluster.runtime, "use_token_if_available", lambda: None)
    monkeypatch.setattr(cluster.runtime, "prepare_to_join", lambda address: None)  # it would set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER for the whole session
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refused)
    assert main(["run", "--address", "127.0.0.1:9", "--output", str(tmp_path / "out"), "--no-report"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("hybridtrain: error: no Ray cluster answers at 127.0.0.1:9") and "hybridtrain cluster up" in err, err


@pytest.mark.parametrize("error", [errors.RunError("training failed: worker died"), errors.CheckpointError("no intact checkpoint"),
                                   errors.VerificationError("the ONNX export does not reproduce")])
def test_a_run_or_check_that_did_not_finish_exits_1(error: Exception, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch, no_ray: None) -> None:
    import cluster.launch

    def fails(plan, **kwargs):
        raise error

    monkeypatch.setattr(cluster.launch, "execute_run", fails)
    assert main(["run", "--output", str(tmp_path / "out"), "--no-report"]) == 1
    assert capsys.readouterr().err == f"hybridtrain: error: {error}\n"


# ==== a bug is a traceback, not the user's mistake ==============================================

@pytest.mark.parametrize("bug", [KeyError("bug"), ValueError("bug"), FileNotFoundError("bug"), RuntimeError("bug"), TypeError("bug")])
@pytest.mark.parametrize("where", ["cluster.experiment.build_config", "cluster.launch.plan_run"])
def test_a_bug_early_in_run_propagates_as_a_traceback(bug: Exception, where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      no_ray: None) -> None:
    module, name = where.rsplit(".", 1)

    def buggy(*args, **kwargs):
        raise bug

    monkeypatch.setattr(importlib.import_module(module), name, buggy)
    with pytest.raises(type(bug), match="bug"):
        main(["run", "--output", str(tmp_path / "out")])


def test_ctrl_c_exits_130(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import cluster.experiment

    def interrupted(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cluster.experiment, "build_config", interrupted)
    assert main(["run", "--output", str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err == "hybridtrain: interrupted\n"


# ==== --verbose means one thing ==================================================================

@pytest.mark.parametrize(("argv", "verbose"), [
    (["run"], False), (["run", "--verbose"], True), (["run", "-v"], True), (["--verbose", "run"], True), (["-v", "run"], True),
    (["tune", "--verbose"], True), (["-v", "tune"], True), (["tune"], False), (["-v", "report", "x"], True), (["report", "x"], False),
])
def test_verbose_is_one_flag_before_or_after_the_command(argv: list[str], verbose: bool) -> None:
    args = build_parser().parse_args(argv)
    assert args.verbose is verbose
    if args.command in ("run", "tune"):
        from cluster.cli import _config_and_dir

        config, _ = _config_and_dir(args, sweep=args.command == "tune", root="runs")
        assert config.cluster.verbose is verbose  # Ray's and the workers' logs on the terminal


@pytest.fixture()
def logger_levels():
    levels = {name: logging.getLogger(name).level for name in PACKAGES}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.parametrize("argv", [["-v", "report"], ["--verbose", "report"]])
def test_verbose_turns_on_hybridtrain_debug_messages_only(argv: list[str], tmp_path: Path, logger_levels: None,
                                                          capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    root_config = []
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: root_config.append(kwargs))
    assert main([*argv, str(tmp_path / "gone")]) == 2
    assert all(logging.getLogger(name).getEffectiveLevel() == logging.DEBUG for name in PACKAGES)
    assert root_config[0]["level"] == logging.WARNING  # other libraries' debug messages stay off
