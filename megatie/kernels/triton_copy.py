"""Persistent Triton kernel behind ``CopyPlan`` / ``multi_tensor_copy_(..., backend="triton")``.

The copy is bytewise, so one launch covers a whole list whatever its dtypes. Every tensor is
cut into chunks of ``chunk_bytes`` (a tensor's chunks never hold another tensor's bytes) and
the chunks of the list are numbered in order. A grid of a few programs per SM splits that
numbering into contiguous runs, one per program: a program binary-searches the tensor table
once for its first chunk, then walks its run, moving to the next tensor when it crosses one
(every tensor owns at least one chunk, so a step moves on by at most one tensor).

Pairs whose source and destination addresses are both 16-byte aligned are copied as int32
words with alignment hints, so loads and stores are 16-byte vectors; the last (under 16)
bytes of such a tensor go through a masked byte copy. Other pairs are copied in the widest
word both addresses allow (8, 4, 2 or 1 bytes), in a separate launch, unvectorised.

The tensor table (int64 ``[5, n + 1]``: source address, destination address, body words,
tail bytes, first chunk with a sentinel) is built and uploaded once per ``FusedCopy``, i.e.
once per plan. Raw addresses let one table name tensors from unrelated allocations, and work
in the Triton interpreter on CPU tensors, which is how the tests run this exact kernel.

This module imports Triton at import time; ``megatie.kernels.copy`` imports it only when the
Triton backend is actually used.
"""

from __future__ import annotations

import contextlib
from typing import Dict, List, Sequence, Tuple

import torch
import triton
import triton.language as tl

# Bytes a program moves per loop step. 16 KiB at 8 warps is four 16-byte loads per thread in
# flight before the first store; with PROGRAMS_PER_SM resident programs that is 64 KiB in
# flight per SM, above what Little's law asks of HBM3 (~3.3 TB/s x ~1 us / 132 SMs ~ 25 KiB).
# Provisional until measured on GPU by benchmarks/copy_kernel.py.
CHUNK_BYTES = 16 * 1024
NUM_WARPS = 8
PROGRAMS_PER_SM = 4
# Programs used under the interpreter (no SMs to count): enough that tests cross programs.
INTERPRETER_PROGRAMS = 8
VECTOR_BYTES = 16
# Word type for the vector class and for each unvectorised word width.
_WORDS = {VECTOR_BYTES: (tl.int32, 4), 8: (tl.int64, 8), 4: (tl.int32, 4), 2: (tl.int16, 2), 1: (tl.int8, 1)}


def _copy_kernel(meta_ptr, n_tensors, n_chunks, search_steps,
                 WORD: tl.constexpr, WORD_BYTES: tl.constexpr, CHUNK: tl.constexpr, VEC: tl.constexpr):
    stride = n_tensors + 1
    first_ptr = meta_ptr + 4 * stride
    pid = tl.program_id(0).to(tl.int64)
    nprog = tl.num_programs(0).to(tl.int64)
    c_begin = pid * n_chunks // nprog
    c_end = (pid + 1) * n_chunks // nprog
    # Largest t with first[t] <= c_begin (first[0] == 0 and first is strictly increasing).
    lo = pid * 0
    hi = lo + n_tensors - 1
    for _ in range(search_steps):
        mid = (lo + hi + 1) // 2
        right = tl.load(first_ptr + mid) <= c_begin
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid - 1)
    t = lo
    for c in range(c_begin, c_end):
        t += (tl.load(first_ptr + t + 1) <= c).to(tl.int64)
        src = tl.load(meta_ptr + t)
        dst = tl.load(meta_ptr + stride + t)
        body = tl.load(meta_ptr + 2 * stride + t)
        start = (c - tl.load(first_ptr + t)) * CHUNK
        s = (src + start * WORD_BYTES).to(tl.pointer_type(WORD))
        d = (dst + start * WORD_BYTES).to(tl.pointer_type(WORD))
        if VEC:
            # Addresses come from memory, so the compiler cannot see their alignment.
            s = tl.multiple_of(s, 16)
            d = tl.multiple_of(d, 16)
        offs = tl.arange(0, CHUNK)
        left = body - start
        if left >= CHUNK:
            # Full chunk: no mask at all.
            tl.store(d + offs, tl.load(s + offs))
        else:
            if VEC:
                # Bodies are whole 16-byte vectors, so the mask is constant over each vector
                # and the masked accesses stay 16 bytes wide.
                left = tl.multiple_of(left, 16 // WORD_BYTES)
            mask = offs < left
            tl.store(d + offs, tl.load(s + offs, mask=mask), mask=mask)
            # The tensor's last chunk also copies the bytes after its last whole word/vector.
            tail = tl.load(meta_ptr + 3 * stride + t)
            b = tl.arange(0, 16)
            bmask = b < tail
            sb = (src + body * WORD_BYTES).to(tl.pointer_type(tl.int8))
            db = (dst + body * WORD_BYTES).to(tl.pointer_type(tl.int8))
            tl.store(db + b, tl.load(sb + b, mask=bmask), mask=bmask)


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
        kernel = triton.jit(_copy_kernel, do_not_specialize=["n_tensors", "n_chunks", "search_steps"])
        _KERNELS[mode] = kernel
    return kernel


def word_class(src_addr: int, dst_addr: int) -> int:
    """16 when both addresses allow 16-byte vectors, else the widest common word (8/4/2/1)."""
    both = src_addr | dst_addr
    if both % VECTOR_BYTES == 0:
        return VECTOR_BYTES
    return min(8, both & -both)


def _rows(pairs: Sequence[Tuple[int, int, int]], cls: int, chunk: int) -> Tuple[List[List[int]], int]:
    """Table rows for (src_addr, dst_addr, nbytes) pairs of one word class, and the chunk count."""
    word = _WORDS[cls][1]
    rows: List[List[int]] = [[], [], [], [], []]
    chunks = 0
    for sa, da, nbytes in pairs:
        body_bytes = nbytes - nbytes % cls  # whole vectors (cls 16) or whole words
        body = body_bytes // word
        tail = nbytes - body_bytes
        for row, value in zip(rows, (sa, da, body, tail, chunks)):
            row.append(value)
        # A tail that does not fit in the last partial chunk gets a chunk of its own.
        chunks += body // chunk + (1 if body % chunk or tail else 0)
    for row in rows[:4]:
        row.append(0)
    rows[4].append(chunks)  # sentinel: the kernel reads first[t + 1]
    return rows, chunks


def _upload(rows: List[List[int]], device: torch.device):
    """The table on ``device``, and a CUDA event marking the end of its upload (or None)."""
    host = torch.tensor(rows, dtype=torch.int64)
    if device.type != "cuda":
        return host, None
    # Pinned + non_blocking: ordered on the current stream without stalling the host.
    table = host.pin_memory().to(device, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return table, event


class _Launch:
    """One kernel launch (one word class on one device), replayed cheaply once compiled."""

    def __init__(self, table: torch.Tensor, n_tensors: int, chunks: int, cls: int, chunk_bytes: int,
                 max_programs: int):
        word_type, word = _WORDS[cls]
        self.grid = min(chunks, max_programs)
        self.args = (table, n_tensors, chunks, max(0, (n_tensors - 1).bit_length()),
                     word_type, word, chunk_bytes // word, cls == VECTOR_BYTES)
        self._fast = None

    def __call__(self) -> None:
        if self._fast is not None:
            self._fast()
            return
        compiled = _kernel()[(self.grid,)](*self.args, num_warps=NUM_WARPS)
        if not interpreter_active() and compiled is not None:
            hooks = triton.knobs.runtime
            if hooks.launch_enter_hook is None and hooks.launch_exit_hook is None:
                self.capture(compiled, torch._C._cuda_getCurrentRawStream, self.args[0].device.index)

    def capture(self, compiled, get_stream, device_index) -> None:
        """Replay through the compiled kernel's launcher, skipping Triton's argument binding,
        specialisation and cache lookup (tens of microseconds of Python per launch)."""
        run, fn, packed = compiled.run, compiled.function, compiled.packed_metadata
        grid, args = self.grid, self.args

        def fast():
            run(grid, 1, 1, get_stream(device_index), fn, packed, None, None, None, *args)

        self._fast = fast


class FusedCopy:
    """A fixed list of contiguous, validated, non-empty pairs on one device, ready to copy.

    Builds and uploads the tensor table(s) once; each call then launches one kernel per word
    class (one in the common all-aligned case). ``chunk_bytes`` (a power of two, >= 16) and
    ``max_programs`` exist so tests can make a small list cross many chunks and programs.
    """

    def __init__(self, dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor],
                 chunk_bytes: int = CHUNK_BYTES, max_programs: int = None):
        if chunk_bytes < VECTOR_BYTES or chunk_bytes & (chunk_bytes - 1):
            raise ValueError(f"chunk_bytes must be a power of two >= {VECTOR_BYTES}, got {chunk_bytes}")
        self.device = dsts[0].device if dsts else torch.device("cpu")
        self._check_mode()
        self._cuda = self.device.type == "cuda"
        self._index = self.device.index
        # The C getter skips torch.cuda.current_device()'s Python (lazy-init check) on every run.
        self._current_device = getattr(torch._C, "_cuda_getDevice", torch.cuda.current_device)
        if max_programs is None:
            max_programs = INTERPRETER_PROGRAMS if not self._cuda else \
                PROGRAMS_PER_SM * torch.cuda.get_device_properties(self.device).multi_processor_count
        classes: Dict[int, List[Tuple[int, int, int]]] = {}
        for d, s in zip(dsts, srcs):
            sa, da = s.data_ptr(), d.data_ptr()
            classes.setdefault(word_class(sa, da), []).append((sa, da, d.numel() * d.element_size()))
        self.launches: List[_Launch] = []
        self._pending = []
        ctx = torch.cuda.device(self.device) if self._cuda else contextlib.nullcontext()
        with ctx:
            for cls in sorted(classes, reverse=True):
                rows, chunks = _rows(classes[cls], cls, chunk_bytes // _WORDS[cls][1])
                table, event = _upload(rows, self.device)
                self._pending += [event] if event is not None else []
                self.launches.append(_Launch(table, len(classes[cls]), chunks, cls, chunk_bytes, max_programs))

    def _check_mode(self) -> None:
        if self.device.type != "cuda" and not interpreter_active():
            raise RuntimeError("backend='triton' on non-CUDA tensors needs the Triton interpreter: "
                               "set TRITON_INTERPRET=1 in the environment")
        if self.device.type == "cuda" and interpreter_active():
            # The interpreter runs on the host and would dereference device addresses.
            raise RuntimeError("backend='triton' cannot run on CUDA tensors while TRITON_INTERPRET=1 "
                               "is set; use backend='torch' or unset it")

    def _wait_upload(self) -> None:
        # A run on another stream than the build's must not read the table before it lands;
        # once the host has seen the upload finish, later runs skip this.
        stream = torch.cuda.current_stream(self.device)
        for event in self._pending:
            stream.wait_event(event)
        # Querying an event is not allowed while a CUDA graph is being captured.
        if not torch.cuda.is_current_stream_capturing() and all(e.query() for e in self._pending):
            self._pending = []

    def __call__(self) -> None:
        if self._cuda:
            if self._pending:
                self._wait_upload()
            if self._current_device() != self._index:
                with torch.cuda.device(self._index):
                    for launch in self.launches:
                        launch()
                return
        for launch in self.launches:
            launch()
