"""Fused Triton kernel behind ``multi_tensor_copy_(..., backend="triton")``.

One launch copies a whole list of contiguous tensors that share an element size. The work is
cut into fixed-size chunks of ``BLOCK`` elements; program ``pid`` handles global chunk ``pid``
and finds the tensor it belongs to by a binary search over the tensors' first-chunk indices,
which live in a small int64 table on the device next to the raw source/destination addresses
and element counts. Raw addresses (rather than offsets from a base pointer) keep the table
valid for tensors from unrelated allocations, and they also work in the Triton interpreter on
CPU tensors, which is how the tests exercise this exact kernel.

The copy is bitwise: tensors are reinterpreted as integers of their element size, so NaN
payloads, signed zeros and subnormals survive unchanged.

This module imports Triton at import time; ``megatie.kernels.copy`` imports it only when the
Triton backend is actually used.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Dict, List, Sequence, Tuple

import torch
import triton
import triton.language as tl

# Bytes each program moves. 32 KiB is 128 B per thread at 8 warps, i.e. eight 16-byte vector
# loads in flight per thread before the first store (chosen to hide DRAM latency; untuned), while a
# GPT-2-small block still splits into hundreds of programs to spread over all SMs.
BLOCK_BYTES = 32 * 1024
NUM_WARPS = 8
# Start addresses divisible by this are eligible for the vectorised (hinted) variant; the
# kernel spells it as a literal because Triton only reads constexpr globals.
ALIGNMENT = 16

_INT_TYPES = {1: tl.int8, 2: tl.int16, 4: tl.int32, 8: tl.int64}
SUPPORTED_ITEMSIZES = frozenset(_INT_TYPES)


def _multi_tensor_copy_kernel(
    meta_ptr,
    n_tensors,
    ELEM: tl.constexpr,
    BLOCK: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    # meta is a [4, n_tensors] int64 table: src address, dst address, numel, first chunk.
    pid = tl.program_id(0).to(tl.int64)
    first_chunk_ptr = meta_ptr + 3 * n_tensors
    # Largest k with first_chunk[k] <= pid; first_chunk is strictly increasing (empty tensors
    # are never put in the table) and first_chunk[0] == 0, so the answer is always valid.
    lo = pid * 0
    hi = lo + n_tensors - 1
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi + 1) // 2
        go_right = tl.load(first_chunk_ptr + mid) <= pid
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid - 1)
    src_addr = tl.load(meta_ptr + lo)
    dst_addr = tl.load(meta_ptr + n_tensors + lo)
    numel = tl.load(meta_ptr + 2 * n_tensors + lo)
    start = (pid - tl.load(first_chunk_ptr + lo)) * BLOCK

    src = src_addr.to(tl.pointer_type(ELEM))
    dst = dst_addr.to(tl.pointer_type(ELEM))
    if ALIGNED:
        # Addresses come from memory, so the compiler cannot see their alignment; without
        # this hint every element is a separate narrow load.
        src = tl.multiple_of(src, 16)
        dst = tl.multiple_of(dst, 16)
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= numel:
        # Full chunk: no mask, so the loads/stores vectorise (a mask derived from a numel read
        # at run time has unknown constancy and would force scalar accesses).
        tl.store(dst + offs, tl.load(src + offs))
    else:
        mask = offs < numel
        tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


# triton.jit decides between the compiler and the interpreter when it decorates, from
# TRITON_INTERPRET at that moment. Decorating lazily, once per mode, means the mode in force
# at call time is the one used, whatever order modules were imported in.
_KERNELS: Dict[bool, object] = {}


def interpreter_active() -> bool:
    return bool(triton.knobs.runtime.interpret)


def _kernel():
    mode = interpreter_active()
    kernel = _KERNELS.get(mode)
    if kernel is None:
        kernel = triton.jit(_multi_tensor_copy_kernel, do_not_specialize=["n_tensors"])
        _KERNELS[mode] = kernel
    return kernel


# Device-side tables keyed by everything they encode (addresses, sizes, block, device,
# stream), so a hit is correct by construction even if the tensors were reallocated. Repeated
# copies of the same buffers then cost no host-to-device transfer.
_META_CACHE: "collections.OrderedDict[tuple, Tuple[torch.Tensor, int]]" = collections.OrderedDict()
_META_CACHE_SIZE = 256


def clear_cache() -> None:
    _META_CACHE.clear()


def _search_steps(n: int) -> int:
    # ceil(log2(n)) halvings shrink [0, n-1] to one index; rounding keeps the number of
    # compiled variants small (one per power of two of the tensor count).
    return max(1, (n - 1).bit_length())


def _meta_table(
    entries: Sequence[Tuple[int, int, int]], block: int, device: torch.device
) -> Tuple[torch.Tensor, int]:
    """Return (device int64 table [4, n], total chunks) for (src_addr, dst_addr, numel) rows."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream, block, tuple(entries))
    hit = _META_CACHE.get(key)
    if hit is not None:
        _META_CACHE.move_to_end(key)
        return hit
    chunks = 0
    first = []
    for _, _, numel in entries:
        first.append(chunks)
        chunks += -(-numel // block)
    rows = [[e[0] for e in entries], [e[1] for e in entries], [e[2] for e in entries], first]
    if device.type == "cuda":
        # Pinned + non_blocking keeps the upload ordered on the current stream without
        # stalling the host; the caching host allocator makes the pinned buffer cheap.
        table = torch.tensor(rows, dtype=torch.int64).pin_memory().to(device, non_blocking=True)
    else:
        table = torch.tensor(rows, dtype=torch.int64)
    _META_CACHE[key] = (table, chunks)
    if len(_META_CACHE) > _META_CACHE_SIZE:
        _META_CACHE.popitem(last=False)
    return table, chunks


def fused_copy_(
    dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor], block_bytes: int = BLOCK_BYTES
) -> int:
    """Copy contiguous, validated pairs on one device; returns the number of launches.

    Pairs are grouped by element size and by whether both addresses are 16-byte aligned, one
    launch per group, so a mixed bf16/fp32 list costs two launches (at most four with
    misaligned slices). ``block_bytes`` is exposed so tests can force many small chunks.
    """
    if not dsts:
        return 0
    device = dsts[0].device
    if device.type != "cuda" and not interpreter_active():
        raise RuntimeError(
            "multi_tensor_copy_(backend='triton') on non-CUDA tensors needs the Triton "
            "interpreter: set TRITON_INTERPRET=1 in the environment"
        )
    if device.type == "cuda" and interpreter_active():
        # The interpreter runs on the host and would dereference device addresses.
        raise RuntimeError(
            "multi_tensor_copy_(backend='triton') cannot run on CUDA tensors while "
            "TRITON_INTERPRET=1 is set; use backend='torch' or unset it"
        )
    groups: Dict[Tuple[int, bool], List[Tuple[int, int, int]]] = {}
    for d, s in zip(dsts, srcs):
        numel = d.numel()
        if numel == 0:
            continue
        itemsize = d.element_size()
        if itemsize not in SUPPORTED_ITEMSIZES:
            raise ValueError(f"multi_tensor_copy_: element size {itemsize} is not supported by backend='triton'")
        sa, da = s.data_ptr(), d.data_ptr()
        aligned = sa % ALIGNMENT == 0 and da % ALIGNMENT == 0
        groups.setdefault((itemsize, aligned), []).append((sa, da, numel))

    kernel = _kernel()
    launches = 0
    ctx = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with ctx:
        for (itemsize, aligned), entries in groups.items():
            block = max(1, block_bytes // itemsize)
            if block & (block - 1):
                raise ValueError(f"block of {block} elements is not a power of two")
            table, chunks = _meta_table(entries, block, device)
            kernel[(chunks,)](
                table,
                len(entries),
                ELEM=_INT_TYPES[itemsize],
                BLOCK=block,
                SEARCH_STEPS=_search_steps(len(entries)),
                ALIGNED=aligned,
                num_warps=NUM_WARPS,
            )
            launches += 1
    return launches

