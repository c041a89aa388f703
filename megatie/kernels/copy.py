"""Multi-tensor in-place copy.

``multi_tensor_copy_(dsts, srcs)`` copies every ``srcs[k]`` into ``dsts[k]``. Replicating a
transformer block touches a dozen tensors (several dozen with fp32 masters and Adam moments);
copying them one launch at a time wastes bandwidth on the small ones, so the CUDA path fuses
them into one Triton launch per element size (see ``megatie.kernels.triton_copy``) and
everything else uses ``torch._foreach_copy_``.

Triton is imported only when the Triton backend is used, so importing megatie never pulls it
in (and never freezes the interpreter/compiler choice, which Triton makes when a kernel is
decorated).
"""

from __future__ import annotations

from typing import List, Sequence

import torch

_BACKENDS = ("auto", "torch", "triton")


def _validate(dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor]) -> None:
    if len(dsts) != len(srcs):
        raise ValueError(f"multi_tensor_copy_: {len(dsts)} destinations but {len(srcs)} sources")
    for k, (d, s) in enumerate(zip(dsts, srcs)):
        if not isinstance(d, torch.Tensor) or not isinstance(s, torch.Tensor):
            raise ValueError(f"multi_tensor_copy_: pair {k} is not a pair of tensors")
        if d.dtype != s.dtype:
            raise ValueError(f"multi_tensor_copy_: pair {k} has dtypes {d.dtype} (dst) and {s.dtype} (src)")
        if d.shape != s.shape:
            raise ValueError(
                f"multi_tensor_copy_: pair {k} has shapes {tuple(d.shape)} (dst) and {tuple(s.shape)} (src)"
            )
        if d.device != s.device:
            raise ValueError(f"multi_tensor_copy_: pair {k} is on {d.device} (dst) and {s.device} (src)")


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _auto_uses_triton(dsts: Sequence[torch.Tensor]) -> bool:
    if any(d.device.type != "cuda" for d in dsts) or not _triton_importable():
        return False
    from megatie.kernels import triton_copy

    # Under TRITON_INTERPRET=1 the kernel would run on the host against device addresses.
    return not triton_copy.interpreter_active()


def _copy_triton(dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor], block_bytes=None) -> int:
    try:
        from megatie.kernels import triton_copy
    except ImportError as exc:
        raise RuntimeError("multi_tensor_copy_(backend='triton') needs the 'triton' package") from exc

    devices = {d.device for d in dsts}
    if len(devices) > 1:
        # One launch addresses one device; split rather than refuse.
        return sum(
            _copy_triton([d for d in dsts if d.device == dev], [s for d, s in zip(dsts, srcs) if d.device == dev],
                         block_bytes)
            for dev in devices
        )
    fused_d: List[torch.Tensor] = []
    fused_s: List[torch.Tensor] = []
    strided_d: List[torch.Tensor] = []
    strided_s: List[torch.Tensor] = []
    for d, s in zip(dsts, srcs):
        if d.is_contiguous() and s.is_contiguous():
            fused_d.append(d)
            fused_s.append(s)
        else:
            strided_d.append(d)
            strided_s.append(s)
    kwargs = {} if block_bytes is None else {"block_bytes": block_bytes}
    launches = triton_copy.fused_copy_(fused_d, fused_s, **kwargs)
    if fused_d:
        # Writes through raw pointers are invisible to autograd's in-place checks.
        torch.autograd.graph.increment_version(fused_d)
    if strided_d:
        torch._foreach_copy_(strided_d, strided_s)
        launches += 1
    return launches


def multi_tensor_copy_(
    dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor], backend: str = "auto"
) -> None:
    """Copy ``srcs[k]`` into ``dsts[k]`` in place for every k (no autograd).

    Each pair must agree in dtype, shape and device (``ValueError`` otherwise); pairs may mix
    dtypes and sizes freely, and a list may span devices.

    Backends:

    - ``"torch"``: ``torch._foreach_copy_`` (any device, any layout).
    - ``"triton"``: one fused Triton launch per element size (two for a bf16 + fp32 list;
      pairs whose addresses are not 16-byte aligned go to an extra, unvectorised launch).
      The copy is bitwise. Runs on CUDA, and on CPU tensors when ``TRITON_INTERPRET=1`` is
      set (the tests use this); otherwise it raises ``RuntimeError``.
    - ``"auto"`` (default): ``"triton"`` for CUDA tensors when Triton is installed and the
      interpreter is off, ``"torch"`` everywhere else.

    Non-contiguous tensors: the fused kernel handles only pairs where both tensors are
    contiguous; any other pair is copied correctly by ``torch._foreach_copy_`` in one extra
    call, so callers never need to check layouts. Sources must not partially overlap their
    destinations, nor destinations each other (the order of writes is unspecified).
    """
    if backend not in _BACKENDS:
        raise ValueError(f"multi_tensor_copy_: unknown backend {backend!r}; choose from {_BACKENDS}")
    _validate(dsts, srcs)
    if not dsts:
        return
    if backend == "auto":
        backend = "triton" if _auto_uses_triton(dsts) else "torch"
    with torch.no_grad():
        if backend == "triton":
            _copy_triton(dsts, srcs)
        else:
            torch._foreach_copy_(list(dsts), list(srcs))
