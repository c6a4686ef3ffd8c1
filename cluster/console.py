"""What a person sees on the terminal, and where everything else goes.

By default the driver keeps Ray's and the workers' own output off the terminal (`log_to_driver=False`:
no `(RayTrainWorker pid=...)` lines, no `TrainingReport(...)` dicts, no DeepSpeed or Serve start-up
chatter) and prints the run's progress itself: rank 0 appends its progress lines (epochs, advisor
verdicts, resumes) to `RUN_DIR/progress.log`, which `ProgressTail` follows while the run trains. At the
end, `collect_ray_logs` copies this node's Ray session logs (every worker's stdout and stderr, Serve,
the Train controller) into `RUN_DIR/logs/ray/`. `--verbose` (`cluster.verbose=true`) turns the echo
back on and the tail off.
"""

from __future__ import annotations

import logging
import shutil
import sys
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

RAY_LOGS = "logs/ray"
_MAX_LOG_BYTES = 64 * 1024 * 1024  # per file; larger logs are cut to their last 64 MiB

# Driver-side loggers whose INFO lines are Ray internals to a user (Serve's controller, proxy and app start-up).
_QUIET_LOGGERS = ("ray.serve", "ray.train", "ray.tune", "ray.data")


def quiet_driver_loggers() -> None:
    """Ray internals at INFO stay off the terminal; warnings (a token missing, a fallback) still show."""
    import ray.serve  # noqa: F401 - Serve sets its logger to INFO when first imported: import it before quieting it

    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


class ProgressTail:
    """Follow a file another process appends to and print each new complete line (a thread).

    Starts at the file's current end (a resumed run's earlier lines are not printed again); `stop()`
    prints what is left, including a last line without a newline.
    """

    def __init__(self, path: Path, *, interval_s: float = 0.5, stream=None) -> None:
        self.path = path
        self.interval_s = interval_s
        self.stream = stream or sys.stdout
        self.offset = path.stat().st_size if path.is_file() else 0
        self._pending = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hybridtrain-progress", daemon=True)

    def __enter__(self) -> ProgressTail:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._drain(final=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._drain(final=False)

    def _drain(self, *, final: bool) -> None:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as handle:
                handle.seek(self.offset)
                chunk = handle.read()
                self.offset = handle.tell()
        except FileNotFoundError:
            return
        text = self._pending + chunk
        lines = text.split("\n")
        self._pending = "" if final else lines.pop()
        for line in lines:
            if line:
                self.stream.write(line + "\n")
        self.stream.flush()


def collect_ray_logs(destination: Path, *, since: float) -> int:
    """Copy this node's Ray session log files written since `since` (epoch seconds) into `destination`.

    Returns the number of files copied; 0 (and a debug line) when there is no local Ray session. Files
    larger than 64 MiB keep their last 64 MiB. Nothing here may fail a run: errors are logged.
    """
    try:
        import ray._private.worker as ray_worker

        node = ray_worker._global_node
        logs = Path(node.get_logs_dir_path()) if node is not None else None
    except Exception as error:  # Ray moved its internals: the run is fine, only the copy is missing
        logger.warning("could not find Ray's session logs to copy (%s)", error)
        return 0
    if logs is None or not logs.is_dir():
        logger.debug("no local Ray session logs to copy")
        return 0
    copied = 0
    for source in sorted(logs.rglob("*")):
        try:
            if not source.is_file() or source.stat().st_mtime < since:
                continue
            target = destination / source.relative_to(logs)
            target.parent.mkdir(parents=True, exist_ok=True)
            size = source.stat().st_size
            if size <= _MAX_LOG_BYTES:
                shutil.copyfile(source, target)
            else:
                with open(source, "rb") as reader, open(target, "wb") as writer:
                    reader.seek(size - _MAX_LOG_BYTES)
                    writer.write(reader.read())
            copied += 1
        except OSError as error:
            logger.warning("could not copy Ray log %s: %s", source, error)
    return copied


def since_now() -> float:
    """A start time for `collect_ray_logs` with a margin for file systems with coarse timestamps."""
    return time.time() - 2.0
