"""Config validation: bad values fail before Ray starts, with a message naming the field."""

from __future__ import annotations

import pytest

from cluster.cli import main
from cluster.experiment import ConfigError, build_config, parse_override, read_config, write_config


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("train.epochs=abc", "train.epochs"),
        ("train.epochs=0", "train.epochs"),
        ("train.zero_stage=4", "train.zero_stage"),
        ("train.lr=-0.1", "train.lr"),
        ("train.optimizer=lamb", "train.optimizer"),
        ("train.use_gpu=maybe", "train.use_gpu"),
        ("model.kind=transformer", "model.kind"),
        ("model.dropout=1.5", "model.dropout"),
        ("data.val_fraction=0.7", "data.val_fraction"),
        ("cluster.num_cpus=0", "cluster.num_cpus"),
        ("train.nope=1", "train.nope"),
        ("nope=1", "nope"),
        ("train=3", "train"),
    ],
)
def test_bad_value_names_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        build_config(overrides=[override])


def test_the_research_modes_are_their_own_section() -> None:
    config = build_config(overrides=["modes.curriculum=true", "modes.batch_selection=on", "modes.unfreeze_every=2"])
    assert (config.modes.curriculum, config.modes.batch_selection, config.modes.unfreeze_every) == (True, "on", 2)
    assert build_config(overrides=["modes.batch_selection=off"]).modes.batch_selection == "off"  # YAML's off is false: both work
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['train\.curriculum'\]"):
        build_config(overrides=["train.curriculum=true"])
    with pytest.raises(ConfigError, match=r"modes\.curriculum_pace must be in \[0\.02, 1\]"):
        build_config(overrides=["modes.curriculum_pace=0.01"])
    # the rules that span sections: L2-SP needs the pretrained weights, whole on every rank
    with pytest.raises(ConfigError, match=r"modes\.l2sp=0\.1 pulls weights toward pretrained ones: set model\.pretrained"):
        build_config(overrides=["modes.l2sp=0.1"])
    with pytest.raises(ConfigError, match=r"modes\.l2sp=0\.1 needs train\.zero_stage 0-2"):
        build_config(recipe="zero3", overrides=["modes.l2sp=0.1", "model.pretrained=."])


def test_overrides_recipe_and_file_compose(tmp_path) -> None:
    config_file = tmp_path / "exp.yaml"
    config_file.write_text("train:\n  epochs: 5\n  lr: 0.01\nmodel:\n  kind: mlp\n")
    config = build_config(recipe="smoke", config_file=config_file, overrides=["train.epochs=10", "data.path=shapes.npz"])
    assert config.train.epochs == 10  # --set beats the file
    assert config.train.lr == 0.01  # the file beats the recipe
    assert config.train.zero_stage == 2  # from the recipe
    assert config.model.kind == "mlp"
    assert config.data.path == "shapes.npz"


def test_parse_override_types() -> None:
    assert parse_override("train.lr=1e-3") == {"train": {"lr": 1e-3}}
    assert parse_override("train.use_gpu=null") == {"train": {"use_gpu": None}}
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.lr")


def test_config_round_trips_through_yaml(tmp_path) -> None:
    config = build_config(recipe="smoke", overrides=["train.lr=0.02"])
    write_config(config, tmp_path / "config.yaml")
    assert read_config(tmp_path / "config.yaml") == config


def test_unknown_recipe_and_bad_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="unknown recipe 'huge'"):
        build_config(recipe="huge")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config(config_file=bad)
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(config_file=tmp_path / "missing.yaml")


def test_cli_exits_nonzero_naming_the_field(capsys, tmp_path) -> None:
    code = main(["run", "--set", "train.zero_stage=7", "--output", str(tmp_path / "r")])
    assert code == 2
    assert "train.zero_stage" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing started, nothing written


def test_cli_names_a_missing_data_file(capsys, tmp_path) -> None:
    missing = tmp_path / "nothere.npz"
    code = main(["run", "--set", f"data.path={missing}", "--output", str(tmp_path / "r")])
    assert code == 2
    assert str(missing) in capsys.readouterr().err


def test_cli_names_a_malformed_data_file(capsys, tmp_path) -> None:
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"this is not a zip archive")
    code = main(["run", "--set", f"data.path={broken}", "--output", str(tmp_path / "r")])
    assert code == 2
    err = capsys.readouterr().err
    assert str(broken) in err and "not a readable .npz" in err


def _empty_csv(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("")
    return path, path, "the file is empty"


def _truncated_npz(tmp_path):
    import numpy as np

    path = tmp_path / "cut.npz"
    np.savez(path, x=np.zeros((30, 4)), y=np.arange(30) % 3)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path, path, "not a readable .npz file, truncated"


def _single_class_csv(tmp_path):
    path = tmp_path / "one.csv"
    path.write_text("a,b,label\n" + "".join(f"{i},{i},cat\n" for i in range(30)))
    return path, path, "a single class ('cat', 30 samples)"


def _small_class_csv(tmp_path):
    path = tmp_path / "small.csv"
    path.write_text("a,b,label\n" + "".join(f"{i},{i},{'dog' if i < 2 else 'cat'}\n" for i in range(30)))
    return path, path, "class 'dog' (2 samples)"


def _csv_without_label(tmp_path):
    path = tmp_path / "nolabel.csv"
    path.write_text("a,b\n1,2\n3,4\n")
    return path, path, "label column 'label' not found"


def _unreadable_image(tmp_path):
    from PIL import Image

    root = tmp_path / "images"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(12):
            Image.new("RGB", (6, 6), (i, 0, 0)).save(root / name / f"{i}.png")
    bad = root / "dog" / "notes.png"
    bad.write_text("not an image")
    return root, bad, "not a readable image"


@pytest.mark.parametrize("make", [_empty_csv, _truncated_npz, _single_class_csv, _small_class_csv, _csv_without_label, _unreadable_image])
def test_cli_refuses_bad_data_before_starting_anything(capsys, tmp_path, monkeypatch, make) -> None:
    import sys

    import cluster.launch

    def no_cluster(*args, **kwargs):
        raise AssertionError("bad data reached cluster.connect: Ray would have started")

    def ray_up() -> bool:
        ray = sys.modules.get("ray")
        return ray is not None and ray.is_initialized()

    monkeypatch.setattr(cluster.launch, "connect", no_cluster)
    data_path, named, problem = make(tmp_path)
    run_dir = tmp_path / "r"
    before = ray_up()  # an earlier test module's embedded Ray may still be up; this command must not start one
    code = main(["run", "--set", f"data.path={data_path}", "--output", str(run_dir)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{named}: " in err and problem in err, err
    assert ray_up() == before
    assert not run_dir.exists() and not (run_dir / "config.yaml").exists()  # nothing started, nothing written
