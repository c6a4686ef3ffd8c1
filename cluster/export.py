"""Export a finished run's model to ONNX, and check the export with onnxruntime against PyTorch.

The graph takes what the PyTorch model takes: `input`, the normalised float32 features shaped
(batch, *sample_shape), with a dynamic batch dimension; it returns `logits`. Raw samples are normalised
first with model.json's `normalizer`, as `cluster.predict` does.

Exporter: torch.onnx's dynamo exporter (`torch.export` + onnxscript), the default since PyTorch 2.9. The
legacy TorchScript exporter (`dynamo=False`) reproduces every model kind here as well, and faster (well
under a second against 1-4 s on CPU), but warns on every call that it is deprecated and will be removed.
The dynamo exporter's own noise is two harmless messages, silenced around the export: a log line for each
torchvision op it skips (torchvision is not a dependency) and a FutureWarning raised inside torch's pytree
code. It writes opset 18 or later; asked for less, it would quietly write 18, so that is refused.

An export is written under a temporary name and takes its final name only once onnxruntime has reproduced
the PyTorch logits; the figures of that check go to `<out>.json`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import onnxscript
import torch
from safetensors import SafetensorError

from cluster.experiment import read_config
from cluster.predict import load_model
from orchestration.errors import ExportError, VerificationError
from workers.data import Normalizer, load_dataset, stratified_split
from workers.streaming import TEST, first_rows, scan, wants_streaming

logger = logging.getLogger(__name__)

MIN_OPSET = 18  # the dynamo exporter's lowest: its op library is written against opset 18
LOGIT_TOLERANCE = 1e-4  # max |logit difference| allowed, relative to the largest |logit| (at least 1): fp32 kernels sum in other orders
RANDOM_INPUT_SEED = 0


@dataclass(kw_only=True, slots=True)
class Comparison:
    """onnxruntime's logits against PyTorch's on the same inputs."""

    samples: int
    max_abs_diff: float
    tolerance: float
    agreement: float  # fraction of samples whose predicted class (argmax) is the same

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.agreement == 1.0


@dataclass(kw_only=True, slots=True)
class ExportResult:
    """A verified export: where it is, and the check that passed."""

    path: Path  # the verified .onnx file
    report_path: Path  # its check's figures, JSON
    inputs: str  # where the check's samples came from: the run's test split, or seeded random normal
    opset: int
    comparison: Comparison


def compare_logits(reference: np.ndarray, candidate: np.ndarray, *, relative_tolerance: float = LOGIT_TOLERANCE) -> Comparison:
    """Max |reference - candidate| against `relative_tolerance * max(1, max |reference|)`, and the
    fraction of rows whose argmax agrees. Passing needs both: the difference within tolerance and every
    predicted class the same."""
    return Comparison(
        samples=len(reference),
        max_abs_diff=float(np.max(np.abs(reference - candidate), initial=0.0)),
        tolerance=relative_tolerance * max(1.0, float(np.max(np.abs(reference), initial=0.0))),
        agreement=float(np.mean(reference.argmax(axis=1) == candidate.argmax(axis=1))) if len(reference) else 1.0,
    )


def check_inputs(run_dir: Path, meta: dict, count: int) -> tuple[np.ndarray, str]:
    """Up to `count` normalised samples of the run's own test split (config.yaml's data, split as the
    run split it), or `count` seeded random normal ones when that data cannot be loaded here; and a
    description of which."""
    sample_shape = tuple(meta["sample_shape"])
    try:
        data = read_config(run_dir / "config.yaml").data
        if wants_streaming(data):  # the first test rows of the streamed data, without loading it
            source = scan(data)
            if tuple(source.sample_shape) != sample_shape:
                raise ValueError(f"its samples are shaped {tuple(source.sample_shape)}, the model takes {sample_shape}")
            x = Normalizer.from_dict(meta["normalizer"])(first_rows(source, TEST, count, normalize=False)["x"])
            return x, f"test split of {source.source}"
        dataset = load_dataset(data)
        test = stratified_split(dataset.y, val_fraction=data.val_fraction, test_fraction=data.test_fraction, seed=data.seed).test
        if dataset.sample_shape != sample_shape:
            raise ValueError(f"its samples are shaped {dataset.sample_shape}, the model takes {sample_shape}")
    except (OSError, ValueError) as error:  # no config.yaml, data moved or changed: the check still runs
        logger.debug("export check on random inputs: %s", error)
        random = np.random.default_rng(RANDOM_INPUT_SEED).standard_normal((count, *sample_shape), dtype=np.float32)
        return random, f"random normal, seed {RANDOM_INPUT_SEED} (the run's data: {error})"
    x = Normalizer.from_dict(meta["normalizer"])(dataset.x[test[:count]])
    return x, f"test split of {dataset.source}"


def export_onnx(run_dir: str | Path, out: str | Path | None = None, *, opset: int | None = None, check_samples: int = 256) -> ExportResult:
    """Export RUN_DIR's model to `out` (default RUN_DIR/model.onnx) and check it on `check_samples`
    inputs; write the check's figures to `<out>.json`. Raises `ExportError` for a run directory without a
    loadable model, `VerificationError` when onnxruntime disagrees with PyTorch (nothing is left at `out`)."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "model.onnx"
    if opset is not None and not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ExportError(f"opset must be in [{MIN_OPSET}, {onnx.defs.onnx_opset_version()}] (the exporter's and the installed onnx's), got {opset}")
    if check_samples < 1:
        raise ValueError(f"check_samples must be >= 1, got {check_samples}")
    model, meta = _load(run_dir)
    inputs, source = check_inputs(run_dir, meta, check_samples)
    out.parent.mkdir(parents=True, exist_ok=True)
    unverified = out.with_name(f".{out.name}.unverified")
    try:
        _write_graph(model, tuple(meta["sample_shape"]), unverified, opset=opset)
        written_opset = next(entry.version for entry in onnx.load(str(unverified)).opset_import if entry.domain in ("", "ai.onnx"))
        if opset is not None and written_opset != opset:
            raise ExportError(f"asked for opset {opset}, the exporter wrote opset {written_opset}")
        with torch.no_grad():
            reference = model(torch.from_numpy(inputs)).numpy()
        session = onnxruntime.InferenceSession(str(unverified), providers=["CPUExecutionProvider"])
        comparison = compare_logits(reference, session.run(["logits"], {"input": inputs})[0])
        if not comparison.passed:
            raise VerificationError(
                f"{run_dir}: the ONNX export does not reproduce the PyTorch model on {comparison.samples} inputs ({source}): "
                f"max |logit difference| {comparison.max_abs_diff:.3g} (tolerance {comparison.tolerance:.3g}), "
                f"argmax agreement {comparison.agreement:.2%}; nothing written to {out}")
        unverified.replace(out)
    finally:
        unverified.unlink(missing_ok=True)
    result = ExportResult(path=out, report_path=out.with_name(out.name + ".json"), inputs=source, opset=written_opset, comparison=comparison)
    result.report_path.write_text(json.dumps(_report(result), indent=2) + "\n")
    return result


def _load(run_dir: Path) -> tuple[torch.nn.Module, dict]:
    """`cluster.predict.load_model`, its failures as `ExportError`."""
    try:
        return load_model(run_dir)
    except FileNotFoundError as error:
        raise ExportError(str(error)) from error
    except (OSError, KeyError, TypeError, ValueError, RuntimeError, SafetensorError) as error:
        raise ExportError(f"{run_dir}: cannot rebuild the model from model.safetensors + model.json ({type(error).__name__}: {error})") from error


def _write_graph(model: torch.nn.Module, sample_shape: tuple[int, ...], path: Path, *, opset: int | None) -> None:
    """The dynamo export, weights inside the one file. Traced on a batch of 2: torch.export would take a
    batch of 1 for a constant."""
    with _quiet_exporter():
        torch.onnx.export(model, (torch.zeros(2, *sample_shape),), str(path), input_names=["input"], output_names=["logits"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=opset, dynamo=True,
                          external_data=False, verbose=False)


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the dynamo exporter's two harmless messages (see the module docstring)."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*LeafSpec", category=FutureWarning)
            yield
    finally:
        registration.setLevel(level)


def _report(result: ExportResult) -> dict:
    return {
        "path": str(result.path),
        "inputs": result.inputs,
        **asdict(result.comparison),
        "opset": result.opset,
        "exporter": "torch.onnx.export(dynamo=True)",
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "onnxscript": onnxscript.__version__},
    }
