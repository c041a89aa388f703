"""Peak and average training memory.

On CUDA, ``peak_bytes`` is ``torch.cuda.max_memory_allocated`` (what tensors needed) and the
average comes from a background thread that samples the device's used memory through NVML (what
``nvidia-smi`` shows, allocator cache included) every ``interval`` seconds; ``peak_reserved_bytes``
is the allocator's reserved peak. On CPU both come from sampling the process's resident set size
(RSS): that includes the Python interpreter and libraries, so ratios between runs understate the
difference in tensor memory.
"""

from __future__ import annotations

import os
import resource
import threading

import torch


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        # No /proc (macOS): fall back to the peak, the best cheap estimate available.
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if os.uname().sysname == "Darwin" else peak * 1024


class MemoryMonitor:
    """Samples memory in a daemon thread between ``start()`` and ``stop()``."""

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.05):
        self.device = torch.device(device)
        self.interval = interval
        self.samples = 0
        self._sum = 0.0
        self._max = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml = None
        if self.device.type == "cuda":
            try:
                import pynvml

                pynvml.nvmlInit()
                index = self.device.index if self.device.index is not None else torch.cuda.current_device()
                self._nvml = (pynvml, pynvml.nvmlDeviceGetHandleByIndex(index))
            except Exception:  # NVML missing or not permitted: the allocator's figures still work
                self._nvml = None

    def _read(self) -> int:
        if self.device.type == "cuda":
            if self._nvml is not None:
                pynvml, handle = self._nvml
                return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
            return int(torch.cuda.memory_allocated(self.device))
        return current_rss_bytes()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        value = self._read()
        self.samples += 1
        self._sum += value
        self._max = max(self._max, value)

    def start(self) -> "MemoryMonitor":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread = threading.Thread(target=self._run, name="megatie-memory", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        result = {"avg_bytes": int(self._sum / max(self.samples, 1)), "samples": self.samples,
                  "source": "cuda+nvml" if self._nvml else self.device.type}
        if self.device.type == "cuda":
            result["peak_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
            result["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved(self.device))
            result["peak_sampled_bytes"] = self._max
        else:
            result["peak_bytes"] = self._max
        return result
