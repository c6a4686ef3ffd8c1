"""The test split's metrics and the digits data set, computed without scikit-learn in the workers, agree with it."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.epoch import test_metrics as metrics_of


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 6).flatmap(lambda classes: st.tuples(
    st.just(classes), st.lists(st.tuples(st.integers(0, classes - 1), st.integers(0, classes - 1)), min_size=1, max_size=60))))
def test_macro_metrics_and_confusion_match_scikit_learn(case) -> None:
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    classes, pairs = case
    labels, predictions = (np.array(column, dtype=np.int64) for column in zip(*pairs))
    ours = metrics_of(predictions, labels, classes)
    precision, recall, f1, _ = precision_recall_fscore_support(labels, predictions, average="macro", zero_division=0)
    assert ours["test_macro_precision"] == pytest.approx(precision, abs=1e-12)
    assert ours["test_macro_recall"] == pytest.approx(recall, abs=1e-12)
    assert ours["test_macro_f1"] == pytest.approx(f1, abs=1e-12)
    assert ours["test_confusion_matrix"] == confusion_matrix(labels, predictions, labels=list(range(classes))).tolist()
    assert ours["test_accuracy"] == pytest.approx(float((labels == predictions).mean()))


def test_digits_read_from_scikit_learns_file_equal_its_loader() -> None:
    from sklearn.datasets import load_digits as sklearn_digits

    from workers.data import load_digits

    ours, theirs = load_digits(), sklearn_digits()
    assert ours.x.dtype == np.float32 and ours.x.shape == (1797, 1, 8, 8)
    assert np.array_equal(ours.x, (theirs.images / 16.0).astype(np.float32)[:, None, :, :])
    assert np.array_equal(ours.y, theirs.target) and ours.classes == [str(c) for c in theirs.target_names]


def test_a_worker_in_memory_never_imports_scikit_learn() -> None:
    """Its import is 0.9 s of every worker's start (3 s on a loaded 2-core machine); the driver still uses it."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, numpy as np, workers.train_loop, workers.loop, workers.streaming\n"
            "from workers.data import load_digits\nfrom workers.epoch import test_metrics\n"
            "load_digits(); test_metrics(np.array([0, 1]), np.array([1, 1]), 2)\n"
            "print(sorted(name for name in sys.modules if name.split('.')[0] in ('sklearn', 'scipy')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
