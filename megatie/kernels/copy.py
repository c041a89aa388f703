"""Multi-tensor in-place copy: a reusable ``CopyPlan`` and the one-shot ``multi_tensor_copy_``.

Replicating a transformer block touches a dozen tensors (several dozen with fp32 masters and
Adam moments). Two paths copy such a list:

- ``torch``: ``torch._foreach_copy_``, one call per dtype (PyTorch's fused foreach route needs a
  single dtype per list; a mixed list would fall back to one copy launch per tensor).
- ``triton``: the persistent bytewise kernel of ``megatie.kernels.triton_copy``, one launch for
  all 16-byte-aligned contiguous pairs whatever their dtypes. Its tensor table is built and
  uploaded once per plan, so a plan reused every step pays only the launch.

Triton is imported only when the Triton backend is used, so importing megatie never pulls it
in (and never freezes the interpreter/compiler choice, which Triton makes when a kernel is
decorated).
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

_BACKENDS = ("auto", "torch", "triton")

# ``auto`` uses Triton only for CUDA lists of at least this many bytes. Provisional: it comes
# from H100 figures (GB/s read+write as % of one contiguous copy) of the previous fused kernel
# (one chunk per program) against one torch._foreach_copy_ call on the whole list. Foreach won
# every single-dtype list up to the 123 MB GPT-2-XL fp32 block (foreach vs fused): 14 MB small
# bf16 70% vs 13%, 28 MB small fp32 84% vs 39%, 61 MB XL bf16 76% vs 64%, 123 MB XL fp32 87% vs
# 66%. The fused kernel won only the mixed bf16 + fp32 lists (fused vs foreach): 99 MB 41% vs
# 25% (a mixed list is likely what sent foreach to its per-tensor route; the torch path now
# calls it once per dtype, not yet measured) and 430 MB 68% vs 66%. Hence Triton from 128 MiB,
# above the largest list foreach won. Re-measure this kernel with benchmarks/copy_kernel.py
# (run by benchmarks/gpu_suite.py) and move the threshold to the measured crossover.
AUTO_TRITON_MIN_BYTES = 128 << 20


def _validate(dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor], who: str) -> None:
    """Raise a one-line ValueError naming the first pair that cannot be copied."""
    if len(dsts) != len(srcs):
        raise ValueError(f"{who}: {len(dsts)} destinations but {len(srcs)} sources")
    for k, (d, s) in enumerate(zip(dsts, srcs)):
        if not isinstance(d, torch.Tensor) or not isinstance(s, torch.Tensor):
            raise ValueError(f"{who}: pair {k} is not a pair of tensors")
        if d.dtype != s.dtype:
            raise ValueError(f"{who}: pair {k} has dtypes {d.dtype} (dst) and {s.dtype} (src)")
        if d.shape != s.shape:
            raise ValueError(f"{who}: pair {k} has shapes {tuple(d.shape)} (dst) and {tuple(s.shape)} (src)")
        if d.device != s.device:
            raise ValueError(f"{who}: pair {k} is on devices {d.device} (dst) and {s.device} (src)")


def _check_backend(backend: str, who: str) -> None:
    if backend not in _BACKENDS:
        raise ValueError(f"{who}: unknown backend {backend!r}; choose from {_BACKENDS}")


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _auto_uses_triton(dsts: Sequence[torch.Tensor]) -> bool:
    """The measured-fastest path: see AUTO_TRITON_MIN_BYTES."""
    total = 0
    for d in dsts:
        if d.device.type != "cuda":
            return False
        total += d.numel() * d.element_size()
    if total < AUTO_TRITON_MIN_BYTES or not _triton_importable():
        return False
    from megatie.kernels import triton_copy

    # Under TRITON_INTERPRET=1 the kernel would run on the host against device addresses.
    return not triton_copy.interpreter_active()


def _foreach_groups(dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor]):
    """(dsts, srcs) lists per (device, dtype), in first-seen order; empty tensors left out."""
    groups: Dict[Tuple[torch.device, torch.dtype], Tuple[List[torch.Tensor], List[torch.Tensor]]] = {}
    for d, s in zip(dsts, srcs):
        if d.numel():
            ds, ss = groups.setdefault((d.device, d.dtype), ([], []))
            ds.append(d)
            ss.append(s)
    return list(groups.values())


def _fusable(d: torch.Tensor, s: torch.Tensor) -> bool:
    # A bytewise copy is right only for dense layouts without lazy conjugate/negative bits.
    return (d.is_contiguous() and s.is_contiguous() and not (d.is_conj() or s.is_conj())
            and not (d.is_neg() or s.is_neg()))


class CopyPlan:
    """A reusable copy of a fixed list of tensors: ``CopyPlan(dsts, srcs).run()``.

    Validates the pairs once (dtype, shape and device must agree: one-line ``ValueError``
    otherwise), picks the backend once (see ``multi_tensor_copy_``) and, for Triton, builds and
    uploads the kernel's tensor table once, so ``run()`` on a warm plan is a kernel launch (or
    a few foreach calls) and a version bump.

    The plan binds the tensors' storages at build time (it keeps them alive): copies made by
    ``run()`` read the sources' current values, but a tensor re-bound to other memory
    (``p.data = ...``) or whose storage is resized (as ZeRO-3 partitioning does) needs a new
    plan. ``chunk_bytes`` and ``max_programs`` tune the Triton kernel (tests use them to cross
    many chunks and programs with small tensors); ``bump_versions=False`` skips autograd's
    version bump of the destinations (~0.1 us per tensor) where no autograd graph can see them.
    """

    def __init__(self, dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor], backend: str = "auto", *,
                 chunk_bytes: int = None, max_programs: int = None, bump_versions: bool = True):
        _check_backend(backend, "CopyPlan")
        _validate(dsts, srcs, "CopyPlan")
        # Detached aliases: in-place copies without no_grad, sharing the version counters.
        dsts = [d.detach() for d in dsts]
        srcs = [s.detach() for s in srcs]
        if backend == "auto":
            backend = "triton" if _auto_uses_triton(dsts) else "torch"
        self.backend = backend
        self.nbytes = sum(d.numel() * d.element_size() for d in dsts)
        self._fused: list = []
        self._bump: Tuple[torch.Tensor, ...] = ()
        if backend == "torch":
            self._groups = _foreach_groups(dsts, srcs)
            return
        pairs = [(d, s) for d, s in zip(dsts, srcs) if d.numel()]
        fused = [(d, s) for d, s in pairs if _fusable(d, s)]
        rest = [(d, s) for d, s in pairs if not _fusable(d, s)]
        self._groups = _foreach_groups([d for d, _ in rest], [s for _, s in rest])
        self._fused = self._build_fused(fused, chunk_bytes, max_programs)
        if bump_versions:
            # Writes through raw pointers are invisible to autograd's in-place checks.
            self._bump = tuple(d for d, _ in fused)

    @staticmethod
    def _build_fused(fused, chunk_bytes, max_programs) -> list:
        try:
            from megatie.kernels import triton_copy
        except ImportError as exc:
            raise RuntimeError("backend='triton' needs the 'triton' package") from exc
        by_device: Dict[torch.device, list] = {}
        for d, s in fused:
            by_device.setdefault(d.device, []).append((d, s))
        kwargs = {"max_programs": max_programs}
        if chunk_bytes is not None:
            kwargs["chunk_bytes"] = chunk_bytes
        # One launch addresses one device; a list spanning devices gets one FusedCopy each.
        return [triton_copy.FusedCopy([d for d, _ in ps], [s for _, s in ps], **kwargs) for ps in by_device.values()]

    @property
    def launches(self) -> int:
        """Kernel launches plus foreach calls one ``run()`` makes."""
        return sum(len(f.launches) for f in self._fused) + len(self._groups)

    def run(self) -> None:
        """Copy every source into its destination now (on the current CUDA stream)."""
        for fused in self._fused:
            fused()
        for ds, ss in self._groups:
            torch._foreach_copy_(ds, ss)
        if self._bump:
            torch.autograd.graph.increment_version(self._bump)


def multi_tensor_copy_(
    dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor], backend: str = "auto"
) -> None:
    """Copy ``srcs[k]`` into ``dsts[k]`` in place for every k (no autograd).

    Each pair must agree in dtype, shape and device (``ValueError`` otherwise); pairs may mix
    dtypes and sizes freely, and a list may span devices. For a list copied repeatedly, build a
    ``CopyPlan`` once and call its ``run()`` instead: this function plans on every call.

    Backends:

    - ``"torch"``: ``torch._foreach_copy_``, one call per (device, dtype) group.
    - ``"triton"``: one bytewise Triton launch for all contiguous pairs whose addresses are
      16-byte aligned (one more per other alignment); other pairs (strided, conjugate views)
      go through ``torch._foreach_copy_``. Runs on CUDA, and on CPU tensors when
      ``TRITON_INTERPRET=1`` is set (the tests use this); otherwise it raises ``RuntimeError``.
    - ``"auto"`` (default): ``"triton"`` for CUDA lists of at least ``AUTO_TRITON_MIN_BYTES``
      when Triton is installed and the interpreter is off, ``"torch"`` everywhere else. The
      threshold is provisional until measured on GPU by ``benchmarks/copy_kernel.py``.

    Sources must not partially overlap their destinations, nor destinations each other (the
    order of writes is unspecified).
    """
    _check_backend(backend, "multi_tensor_copy_")
    _validate(dsts, srcs, "multi_tensor_copy_")
    if not dsts:
        return
    if backend == "auto":
        backend = "triton" if _auto_uses_triton(dsts) else "torch"
    if backend == "triton":
        CopyPlan(dsts, srcs, backend="triton").run()
        return
    with torch.no_grad():
        for ds, ss in _foreach_groups(dsts, srcs):
            torch._foreach_copy_(ds, ss)
