"""Peak and average training memory, honest across DeepSpeed's counter resets.

On CUDA, ``peak_bytes`` is the allocator's peak (``torch.cuda.max_memory_allocated``: what tensors
needed), ``peak_reserved_bytes`` its reserved peak (cache included), and a background thread samples
the device's used memory through NVML (what ``nvidia-smi`` shows) every ``interval`` seconds for
``avg_bytes`` and ``peak_sampled_bytes``. DeepSpeed resets the CUDA peak counters on its own -
``deepspeed.runtime.utils.empty_cache()`` and ``see_memory_usage(force=True)`` do, once per param
group in every ZeRO optimizer constructor - so a peak read at the end would cover only the time
since the last reset. While a monitor runs, every reset first folds the current peaks into the
run's (``resets_folded`` counts them).

On CPU both figures come from sampling the process's resident set size (RSS): that includes the
Python interpreter and libraries, so ratios between runs understate the difference in tensor memory.
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


class _ResetGuard:
    """One wrapper of ``torch.cuda.reset_peak_memory_stats`` (both names it is reached by; the deprecated
    ``reset_max_memory_*`` call it too) for every running monitor: a reset folds each one's peaks first.
    Installed by the first monitor that starts and removed with the last that stops, in any order - a
    wrapper per monitor would, stopped out of order, restore a stale one and lose the other's peaks."""

    def __init__(self):
        self.monitors: list = []
        self.saved = None

    def add(self, monitor) -> None:
        import torch.cuda.memory as cuda_memory

        if not self.monitors:
            original = cuda_memory.reset_peak_memory_stats
            self.saved = (torch.cuda.reset_peak_memory_stats, original)

            def reset_peak_memory_stats(device=None):
                for running in list(self.monitors):
                    running._folded_reset()
                return original(device)

            torch.cuda.reset_peak_memory_stats = cuda_memory.reset_peak_memory_stats = reset_peak_memory_stats
        self.monitors.append(monitor)

    def discard(self, monitor) -> None:
        import torch.cuda.memory as cuda_memory

        if monitor in self.monitors:
            self.monitors.remove(monitor)
            if not self.monitors:
                torch.cuda.reset_peak_memory_stats, cuda_memory.reset_peak_memory_stats = self.saved
                self.saved = None


_RESET_GUARD = _ResetGuard()


class MemoryMonitor:
    """Samples memory in a daemon thread between ``start()`` and ``stop()``."""

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.05):
        self.device = torch.device(device)
        self.interval = interval
        self.samples = 0
        self.resets_folded = 0
        self._sum = 0.0
        self._max = 0
        self._peak_allocated = 0
        self._peak_reserved = 0
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

    def fold_peaks(self) -> None:
        """Take the allocator's peaks so far into the run's (before anyone resets them)."""
        self._peak_allocated = max(self._peak_allocated, int(torch.cuda.max_memory_allocated(self.device)))
        self._peak_reserved = max(self._peak_reserved, int(torch.cuda.max_memory_reserved(self.device)))

    def _guard_resets(self) -> None:
        _RESET_GUARD.add(self)

    def _unguard_resets(self) -> None:
        _RESET_GUARD.discard(self)

    def _folded_reset(self) -> None:
        self.fold_peaks()
        self.resets_folded += 1

    def start(self) -> "MemoryMonitor":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._guard_resets()
        self._thread = threading.Thread(target=self._run, name="megatie-memory", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        result = {"avg_bytes": int(self._sum / max(self.samples, 1)), "samples": self.samples,
                  "source": "cuda+nvml" if self._nvml else self.device.type,
                  "peak_reserved_bytes": None, "peak_sampled_bytes": None, "resets_folded": self.resets_folded}
        if self.device.type == "cuda":
            self.fold_peaks()
            self._unguard_resets()
            result.update(peak_bytes=self._peak_allocated, peak_reserved_bytes=self._peak_reserved,
                          peak_sampled_bytes=self._max)
        else:
            result["peak_bytes"] = self._max
        return result
