"""Measured memory of a short span of work (a regroup): the peak of live bytes during it minus the live
bytes when it began.

- On CUDA the allocator's own figures: its peak counter is reset when the span begins (a running
  ``MemoryMonitor`` folds its peak first) and read when it ends; a reset inside the span (DeepSpeed
  resets the counters in its optimizer constructors) folds into the span's peak too.
- On CPU torch keeps no allocator statistics, so live tensor storages are accounted. Every storage an
  operator creates inside the span is seen (a ``TorchDispatchMode``: DeepSpeed's flat buffers, masters
  and copies as much as megatie's own) and counted until it dies (a finalizer on the storage).
  Storages alive at the start and reachable from the given roots (the model, the optimizer, the
  engine) are counted off when they die, so a buffer freed inside the span makes room for the next.
  A storage alive at the start that the roots do not reach is never counted off: the figure errs
  high, never low.

``reachable_storage_bytes`` (the census of the roots) is also the CPU memory benchmark's probe.
"""

from __future__ import annotations

import types
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from megatie.metrics.memory import _RESET_GUARD

_NOT_FOLLOWED = (types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
                 types.FrameType, types.CodeType, str, bytes, int, float)


def _storage_of(t: torch.Tensor):
    if t.is_meta or t.layout != torch.strided:
        return None
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensors without a plain storage (sparse, functional)
        return None
    return storage if storage.data_ptr() else None


def reachable_storages(*roots) -> dict:
    """``{storage key: storage}`` of every distinct tensor storage reachable from ``roots``: follows
    containers and instance attributes, not modules, classes or functions (library globals are not
    counted); gradients are followed explicitly."""
    seen, found, stack = set(), {}, list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _NOT_FOLLOWED):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.is_leaf and obj.grad is not None:
                stack.append(obj.grad)
            storage = _storage_of(obj)
            if storage is not None:
                found.setdefault((storage.device.type, storage.data_ptr()), storage)
        elif isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__"):
            stack.append(vars(obj))
    return found


def reachable_storage_bytes(*roots) -> int:
    return sum(s.nbytes() for s in reachable_storages(*roots).values())


def _aliases_input(storage, args, kwargs) -> bool:
    """Whether ``storage`` is an input's (an op that may return its input, such as ``contiguous``)."""
    return any(isinstance(t, torch.Tensor) and (s := _storage_of(t)) is not None and s._cdata == storage._cdata
               for t in tree_leaves((args, kwargs)))


class _StorageAccounting(TorchDispatchMode):
    """Counts the bytes of every storage an operator creates until it dies; see the module docstring."""

    def __init__(self, roots):
        super().__init__()
        self.current = self.peak = 0
        self.watched: dict[int, weakref.finalize] = {}
        self.start_bytes = 0
        for storage in reachable_storages(*roots).values():
            self._watch(storage, counted=False)
            self.start_bytes += storage.nbytes()

    def _watch(self, storage, counted: bool) -> None:
        key, nbytes = storage._cdata, storage.nbytes()
        self.watched[key] = weakref.finalize(storage, self._died, key, nbytes)
        if counted:
            self.current += nbytes
            self.peak = max(self.peak, self.current)

    def _died(self, key: int, nbytes: int) -> None:
        self.watched.pop(key, None)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func._schema.is_mutable:  # a view or an in-place write allocates nothing
            return out
        for t in tree_leaves(out):
            storage = _storage_of(t) if isinstance(t, torch.Tensor) else None
            if storage is not None and storage._cdata not in self.watched and not _aliases_input(storage, args, kwargs):
                self._watch(storage, counted=True)
        return out

    def close(self) -> None:
        for finalizer in list(self.watched.values()):
            finalizer.detach()
        self.watched.clear()


class TransientMeter:
    """``with TransientMeter(device, *roots) as m: ...`` then ``m.peak_bytes`` (the span's peak minus its
    start), ``m.end_bytes`` (its end minus its start: what stays, e.g. the state of blocks that start
    training), ``m.start_bytes`` (live bytes at its start: the allocator's, or the roots' storages) and
    ``m.source`` (``"allocator"`` or ``"tensors"``)."""

    def __init__(self, device: torch.device, *roots):
        self.device, self.roots = torch.device(device), roots
        self.source = "allocator" if self.device.type == "cuda" else "tensors"
        self.peak_bytes = self.start_bytes = self.end_bytes = 0
        self._accounting = None
        self._folded = 0

    # The reset guard calls this before any reset of the CUDA peak counters inside the span.
    def _folded_reset(self) -> None:
        self._folded = max(self._folded, int(torch.cuda.max_memory_allocated(self.device)))

    def __enter__(self) -> "TransientMeter":
        if self.source == "allocator":
            torch.cuda.reset_peak_memory_stats(self.device)  # running monitors fold their peaks first
            _RESET_GUARD.add(self)
            self.start_bytes = int(torch.cuda.memory_allocated(self.device))
        else:
            self._accounting = _StorageAccounting(self.roots)
            self._accounting.__enter__()
            self.start_bytes = self._accounting.start_bytes
        return self

    def __exit__(self, *exc) -> None:
        if self.source == "allocator":
            _RESET_GUARD.discard(self)
            self._folded_reset()
            self.peak_bytes = max(0, self._folded - self.start_bytes)
            self.end_bytes = int(torch.cuda.memory_allocated(self.device)) - self.start_bytes
        else:
            self._accounting.__exit__(*exc)
            self._accounting.close()
            self.peak_bytes = max(0, self._accounting.peak)
            self.end_bytes = self._accounting.current
