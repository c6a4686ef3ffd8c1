"""The driver's live progress display: following a file another process appends to."""

from __future__ import annotations

import io
import time

from cluster.console import ProgressTail


def test_progress_tail_prints_whole_lines_as_they_arrive_and_the_rest_at_stop(tmp_path) -> None:
    path = tmp_path / "progress.log"
    path.write_text("[hybridtrain] an earlier attempt's line\n")  # a resumed run: not printed again
    stream = io.StringIO()
    tail = ProgressTail(path, interval_s=0.02, stream=stream)
    with tail:
        with open(path, "a") as progress:
            progress.write("[hybridtrain] epoch 1\n[hybridtrain] epo")
            progress.flush()
            deadline = time.monotonic() + 5
            while "epoch 1" not in stream.getvalue() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert stream.getvalue() == "[hybridtrain] epoch 1\n"  # the half-written line waits
            progress.write("ch 2\n[hybridtrain] done")
    assert stream.getvalue().splitlines() == ["[hybridtrain] epoch 1", "[hybridtrain] epoch 2", "[hybridtrain] done"]


def test_progress_tail_waits_for_a_file_that_does_not_exist_yet(tmp_path) -> None:
    path = tmp_path / "progress.log"
    stream = io.StringIO()
    with ProgressTail(path, interval_s=0.02, stream=stream):
        time.sleep(0.05)
        path.write_text("[hybridtrain] training\n")
    assert stream.getvalue() == "[hybridtrain] training\n"
