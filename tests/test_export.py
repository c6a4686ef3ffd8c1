"""ONNX export of a finished run's model, checked with onnxruntime against PyTorch: no Ray, no DeepSpeed."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from safetensors.torch import save_file

from cluster import export as export_module
from cluster.cli import main
from cluster.experiment import ExperimentConfig, write_config
from cluster.export import ExportError, VerificationError, compare_logits, export_onnx
from cluster.predict import load_model
from workers.config import ModelConfig
from workers.data import Normalizer
from workers.models import build_model

SAMPLE_SHAPES = {"cnn2d": (1, 8, 8), "resnet": (3, 8, 8), "cnn1d": (2, 16), "mlp": (10,)}


def make_run(run_dir: Path, kind: str, sample_shape: tuple[int, ...], *, classes: int = 3) -> Path:
    """A finished run's model files, as workers/train_loop._save_model writes them: fp32 params and
    buffers (integer buffers as they are) in model.safetensors, the meta in model.json. Batch-norm
    running statistics are drawn at random so that eval mode matters."""
    torch.manual_seed(0)
    config = ModelConfig(kind=kind, width=4, hidden=8)
    model = build_model(config, sample_shape, classes)
    for name, buffer in model.named_buffers():
        if name.endswith("running_mean"):
            buffer.copy_(0.1 * torch.randn_like(buffer))
        elif name.endswith("running_var"):
            buffer.copy_(torch.rand_like(buffer) + 0.5)
    tensors = {name: value.float().contiguous() if value.is_floating_point() else value.contiguous() for name, value in model.state_dict().items()}
    run_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(run_dir / "model.safetensors"))
    features = np.random.default_rng(0).normal(2.0, 3.0, size=(32, *sample_shape)).astype(np.float32)
    meta = {"model": asdict(config), "sample_shape": list(sample_shape), "classes": [f"class{index}" for index in range(classes)],
            "normalizer": Normalizer.fit(features).to_dict(), "data_source": "made by the test"}
    (run_dir / "model.json").write_text(json.dumps(meta, indent=2))
    return run_dir


@pytest.mark.parametrize("kind", sorted(SAMPLE_SHAPES))
def test_export_reproduces_pytorch_for_every_model_kind_at_any_batch_size(tmp_path: Path, kind: str) -> None:
    run_dir = make_run(tmp_path / kind, kind, SAMPLE_SHAPES[kind])
    result = export_onnx(run_dir, check_samples=16)

    assert result.path == run_dir / "model.onnx" and result.path.is_file()
    assert result.comparison.passed and result.comparison.agreement == 1.0 and result.comparison.samples == 16
    assert result.inputs.startswith("random normal")  # no config.yaml: the run's data is not known here
    model, _ = load_model(run_dir)
    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert [node.name for node in session.get_inputs()] == ["input"] and [node.name for node in session.get_outputs()] == ["logits"]
    for batch in (1, 7):
        x = np.random.default_rng(batch).standard_normal((batch, *SAMPLE_SHAPES[kind]), dtype=np.float32)
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        logits = session.run(["logits"], {"input": x})[0]
        assert logits.shape == (batch, 3)
        assert batch == 1 or expected.std(axis=0).max() > 1e-3  # the logits depend on the input: a model worth checking
        np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
        assert (logits.argmax(axis=1) == expected.argmax(axis=1)).all()
    report = json.loads((run_dir / "model.onnx.json").read_text())
    assert report["agreement"] == 1.0 and report["samples"] == 16 and report["max_abs_diff"] <= report["tolerance"]
    assert report["opset"] == result.opset >= 18 and set(report["versions"]) >= {"torch", "onnx", "onnxruntime"}


def test_cli_export_checks_on_the_runs_own_test_split(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """With the run's config.yaml (default data: scikit-learn's digits) the check takes real samples."""
    run_dir = make_run(tmp_path / "run", "mlp", (1, 8, 8), classes=10)
    write_config(ExperimentConfig(), run_dir / "config.yaml")
    out = tmp_path / "exported" / "digits.onnx"

    assert main(["export", str(run_dir), "--out", str(out)]) == 0

    line = capsys.readouterr().out.strip()
    assert str(out) in line and "test split of sklearn:digits" in line and "argmax agreement 100%" in line
    report = json.loads(Path(f"{out}.json").read_text())
    assert report["inputs"] == "test split of sklearn:digits" and report["samples"] == 180  # digits' 10% test split
    assert not (run_dir / "model.onnx").exists()


def test_a_tampered_export_fails_verification_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnx
    from onnx import numpy_helper

    def write_then_tamper(model, sample_shape, path, *, opset):
        write_graph(model, sample_shape, path, opset=opset)
        graph = onnx.load(str(path))
        weight = max(graph.graph.initializer, key=lambda tensor: np.prod(tensor.dims))
        weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) + 0.5, weight.name))
        onnx.save(graph, str(path))

    write_graph = export_module._write_graph
    monkeypatch.setattr(export_module, "_write_graph", write_then_tamper)
    run_dir = make_run(tmp_path / "run", "mlp", (10,))

    with pytest.raises(VerificationError, match="does not reproduce the PyTorch model"):
        export_onnx(run_dir, check_samples=8)
    assert sorted(path.name for path in run_dir.iterdir()) == ["model.json", "model.safetensors"]


def test_compare_logits_scales_its_tolerance_and_needs_every_class_to_agree() -> None:
    reference = np.array([[100.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    within = compare_logits(reference, reference + np.float32(5e-3))  # 1e-4 of the largest |logit| is 1e-2
    assert within.passed and within.tolerance == pytest.approx(1e-2)
    flipped = compare_logits(reference, reference[:, ::-1])
    assert not flipped.passed and flipped.agreement == 0.0


def test_cli_export_of_a_missing_run_dir_exits_2_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "no-such-run"
    assert main(["export", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_a_broken_run_dir_or_a_bad_opset_is_an_export_error(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", "mlp", (10,))
    with pytest.raises(ExportError, match="opset must be in"):
        export_onnx(run_dir, opset=13)  # the dynamo exporter would quietly write 18
    meta = json.loads((run_dir / "model.json").read_text())
    meta["model"]["width"] = 5  # weights no longer fit the model
    (run_dir / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="cannot rebuild the model"):
        export_onnx(run_dir)
    assert not (run_dir / "model.onnx").exists()
