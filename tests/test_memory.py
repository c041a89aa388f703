"""The memory monitor reports the run's real peak, whatever resets the CUDA peak counters on the way.

No GPU is needed: ``torch.cuda``'s allocator statistics are replaced by a fake allocator, and the
resets come the ways they come in a real run - DeepSpeed's CUDA accelerator (what its
``empty_cache()`` and ``see_memory_usage()`` call once per param group in every ZeRO optimizer
constructor), torch's own name for it, and the deprecated ``reset_max_memory_allocated``.
"""

import warnings

import pytest
import torch
import torch.cuda.memory as cuda_memory

from megatie.metrics.memory import MemoryMonitor


class FakeAllocator:
    def __init__(self):
        self.allocated = self.peak = self.reserved_peak = 0

    def alloc(self, n):
        self.allocated += n
        self.peak = max(self.peak, self.allocated)
        self.reserved_peak = max(self.reserved_peak, self.allocated + 8)

    def free(self, n):
        self.allocated -= n

    def reset(self, device=None):
        self.peak = self.allocated
        self.reserved_peak = self.allocated + 8


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = FakeAllocator()
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: fake.peak)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: fake.reserved_peak)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: fake.allocated)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", fake.reset)
    monkeypatch.setattr(cuda_memory, "reset_peak_memory_stats", fake.reset)
    return fake


def _deepspeed_cuda_reset():
    """What DeepSpeed's ``empty_cache()`` does on a GPU after emptying the cache."""
    pytest.importorskip("deepspeed")
    from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator

    CUDA_Accelerator.reset_peak_memory_stats(None)  # needs no instance state: torch.cuda's reset


def test_peak_is_the_maximum_across_resets(fake_cuda):
    monitor = MemoryMonitor("cuda", interval=60).start()
    fake_cuda.alloc(100)   # the run's real peak: e.g. the first optimizer step
    fake_cuda.free(100)
    _deepspeed_cuda_reset()  # a regroup rebuilds the ZeRO optimizer
    fake_cuda.alloc(40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.cuda.memory.reset_max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fake_cuda.alloc(20)
    result = monitor.stop()
    assert result["peak_bytes"] == 100 and result["peak_reserved_bytes"] == 108
    assert result["resets_folded"] == 3
    assert torch.cuda.max_memory_allocated() == 60  # without folding, this is what would be reported
    # Monitoring over, the originals are back: nothing outlives the run.
    assert torch.cuda.reset_peak_memory_stats == fake_cuda.reset
    assert cuda_memory.reset_peak_memory_stats == fake_cuda.reset


def test_monitors_stopped_out_of_order_keep_their_peaks_and_restore_the_originals(fake_cuda):
    """Two monitors (a run and a benchmark's probe): the first to start stops first. The second must
    still fold the peak a later reset would erase, and nothing of either may stay installed."""
    outer = MemoryMonitor("cuda", interval=60).start()
    inner = MemoryMonitor("cuda", interval=60).start()
    fake_cuda.alloc(50)
    fake_cuda.free(50)
    assert outer.stop()["peak_bytes"] == 50
    fake_cuda.alloc(90)
    fake_cuda.free(90)
    torch.cuda.reset_peak_memory_stats()  # the inner monitor's 90 is folded before the reset erases it
    fake_cuda.alloc(10)
    assert inner.stop()["peak_bytes"] == 90
    assert torch.cuda.reset_peak_memory_stats == fake_cuda.reset
    assert cuda_memory.reset_peak_memory_stats == fake_cuda.reset


def test_cpu_monitor_samples_resident_memory():
    monitor = MemoryMonitor("cpu", interval=0.01).start()
    block = torch.ones(32 * 2 ** 20, dtype=torch.uint8)  # touch 32 MB
    monitor.sample()
    result = monitor.stop()
    del block
    assert result["peak_bytes"] >= result["avg_bytes"] > 0 and result["peak_reserved_bytes"] is None
    assert result["source"] == "cpu" and result["samples"] >= 2
