"""Each worker's memory over its run, sampled in a background thread: resident set (RSS) and unique set (USS:
the pages this process alone holds, without the shared libraries and Ray's shared-memory object store that RSS
counts), at the start of the loop and at their peaks. `finish` puts every rank's figures in the final metrics
(`worker_memory`), so a streamed run shows that no worker held its data set."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

SAMPLE_S = 0.2
MB = 2**20


@dataclass
class MemoryWatch:
    start_rss: int = 0
    start_uss: int = 0
    peak_rss: int = 0
    peak_uss: int = 0
    samples: int = 0
    phase: str = "start"  # what the loop is doing (set by the loop); `peak_phase` is where USS peaked
    peak_phase: str = "start"
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> MemoryWatch:
        """Import what every worker imports anyway (DeepSpeed, Ray Data), then take the starting figures."""
        import deepspeed  # noqa: F401
        import psutil
        import ray.data  # noqa: F401
        import torch.distributed  # noqa: F401

        process = psutil.Process()
        info = process.memory_full_info()
        self.start_rss, self.start_uss = info.rss, info.uss
        self._sample(process)
        self._thread = threading.Thread(target=self._run, args=(process,), name="hybridtrain-memory", daemon=True)
        self._thread.start()
        return self

    def _sample(self, process: Any) -> None:
        info = process.memory_full_info()
        if info.uss > self.peak_uss:
            self.peak_uss, self.peak_phase = info.uss, self.phase
        self.peak_rss = max(self.peak_rss, info.rss)
        self.samples += 1

    def _run(self, process: Any) -> None:
        while not self._stop.wait(SAMPLE_S):
            try:
                self._sample(process)
            except Exception:  # noqa: BLE001 - a measurement; the run matters more
                return

    def stop(self) -> dict[str, float]:
        """Stop sampling; the figures in MB."""
        import psutil

        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self._sample(psutil.Process())
        return {"start_rss_mb": round(self.start_rss / MB, 1), "peak_rss_mb": round(self.peak_rss / MB, 1),
                "start_uss_mb": round(self.start_uss / MB, 1), "peak_uss_mb": round(self.peak_uss / MB, 1),
                "peak_uss_growth_mb": round((self.peak_uss - self.start_uss) / MB, 1), "peak_phase": self.peak_phase, "samples": self.samples}
