"""Peak memory of a stretch of work, for the training result and the comparison table.

On CUDA this is the allocator's peak (``torch.cuda.max_memory_allocated``), reset at the start.
On the CPU PyTorch keeps no such counter, so a daemon thread samples the process's resident set
size every few milliseconds and reports the peak above the level at the start (after returning
freed heap pages to the OS): what the run added to the process, the number a user sizing a
machine needs. Sampling can miss spikes shorter than the interval; at a 5 ms interval that is
well under one training step.
"""

from __future__ import annotations

import os
import threading
import time
from types import TracebackType

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """The process's resident set size (Linux /proc; 0 where it is not available)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc), so an earlier run's garbage does not hide this
    run's growth in the resident set."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.mebibytes``."""

    def __init__(self, device: torch.device, interval_s: float = 0.005) -> None:
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._baseline = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
        else:
            _release_free_heap()
            self._baseline = resident_bytes()
            self._thread = threading.Thread(target=self._sample, name="lora2-peak-memory", daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, resident_bytes() - self._baseline)
            time.sleep(self.interval_s)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._baseline
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak_bytes = max(self.peak_bytes, resident_bytes() - self._baseline)

    @property
    def mebibytes(self) -> float:
        return self.peak_bytes / 2**20
