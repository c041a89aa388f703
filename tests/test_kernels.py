"""Tests for megatie.kernels.multi_tensor_copy_.

The Triton backend is tested on CPU tensors through the Triton interpreter, i.e. the very
kernel that runs on CUDA, launched the same way. The interpreter is switched on by a module
fixture rather than globally: megatie decorates its kernel lazily, once per interpreter mode,
so the mode in force at call time is the one used whatever was imported before.
"""

import os
import re
import subprocess
import sys
import zlib

import pytest
import torch

from megatie.kernels import CopyPlan, multi_tensor_copy_
from megatie.kernels import copy as copy_mod

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
# Small chunks make even tiny tensors span several chunks and programs, so chunk boundaries,
# tails and the tensor search are exercised without paying for big tensors in the interpreter.
SMALL_BLOCK_BYTES = 64


def bits(t):
    """Integer view of a tensor: equality of bits, so NaN == NaN and -0.0 != 0.0."""
    return t.contiguous().view(INT_VIEW[t.dtype])


def assert_bitwise_equal(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(bits(a), bits(b))


def special_values(n, dtype, gen):
    """Random values salted with NaN, +-inf, -0.0 and subnormals, which a value copy may alter."""
    x = torch.randn(n, generator=gen).to(dtype)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0], dtype=dtype)
    tiny = torch.finfo(dtype).tiny / 4  # subnormal
    specials = torch.cat([specials, torch.tensor([tiny, -tiny], dtype=dtype)])
    if n >= len(specials):
        idx = torch.randperm(n, generator=gen)[: len(specials)]
        x[idx] = specials
    return x


def poison_(t):
    """Fill with a non-trivial bit pattern (a NaN with payload), so a skipped copy is visible."""
    pattern = {torch.int32: 0x7FC0BEEF, torch.int16: 0x7E5A}[INT_VIEW[t.dtype]]
    t.view(INT_VIEW[t.dtype]).fill_(pattern)
    return t


def random_sizes(gen, count, hi=3000):
    sizes = [1, 2, 3, 31, 33, 257, 1023] + torch.randint(1, hi, (count,), generator=gen).tolist()
    return sizes


def make_guarded(sizes, dtype, gen, max_gap=9):
    """Destinations as slices of one poisoned buffer with random gaps (guard bands) between."""
    gaps = torch.randint(1, max_gap, (len(sizes) + 1,), generator=gen).tolist()
    total = sum(sizes) + sum(gaps)
    buf = poison_(torch.empty(total, dtype=dtype))
    dsts, offset = [], gaps[0]
    for n, gap in zip(sizes, gaps[1:]):
        dsts.append(buf[offset : offset + n])
        offset += n + gap
    return buf, dsts


def check_guarded(buf, dsts, srcs):
    """All copies bitwise right and every byte outside them still the poison pattern."""
    for d, s in zip(dsts, srcs):
        assert_bitwise_equal(d, s)
    expected = poison_(torch.empty_like(buf))
    for d in dsts:
        start = d.storage_offset() - buf.storage_offset()
        expected[start : start + d.numel()] = d.reshape(-1)
    assert torch.equal(bits(buf), bits(expected))


def run_copy(backend, dsts, srcs):
    if backend == "triton-small-block":
        CopyPlan(dsts, srcs, backend="triton", chunk_bytes=SMALL_BLOCK_BYTES).run()
    else:
        multi_tensor_copy_(dsts, srcs, backend=backend)


BACKENDS = ["torch", "auto", "triton", "triton-small-block"]


# The small-block Triton variant walks many blocks per tensor under the (slow) interpreter.
@pytest.fixture(params=[b if b != "triton-small-block" else pytest.param(b, marks=pytest.mark.slow) for b in BACKENDS])
def backend(request):
    if request.param.startswith("triton"):
        request.getfixturevalue("interpret")
    return request.param


# --------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_random_sizes_guarded(backend, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{backend}/{dtype}".encode()))
    sizes = random_sizes(gen, 40)
    srcs = [special_values(n, dtype, gen) for n in sizes]
    buf, dsts = make_guarded(sizes, dtype, gen)
    run_copy(backend, dsts, srcs)
    check_guarded(buf, dsts, srcs)


def test_mixed_dtypes_shapes_and_empty(backend):
    gen = torch.Generator().manual_seed(1)
    shapes = [(1,), (), (0,), (7, 5), (3, 0, 2), (1600,), (33, 17), (2, 3, 4), (4097,)]
    srcs, dsts = [], []
    for i, shape in enumerate(shapes):
        dtype = DTYPES[i % 3]
        n = 1
        for s in shape:
            n *= s
        srcs.append(special_values(n, dtype, gen).reshape(shape))
        dsts.append(poison_(torch.empty(shape, dtype=dtype)))
    run_copy(backend, dsts, srcs)
    for d, s in zip(dsts, srcs):
        assert_bitwise_equal(d, s)


def test_misaligned_slices(backend):
    """Odd element offsets put addresses off 16 bytes: the unhinted kernel variant."""
    gen = torch.Generator().manual_seed(2)
    for dtype in DTYPES:
        sizes = [1, 5, 300, 129]
        srcs_buf = special_values(sum(sizes) + 3, dtype, gen)
        srcs, off = [], 1
        for n in sizes:
            srcs.append(srcs_buf[off : off + n])
            off += n
        buf, dsts = make_guarded(sizes, dtype, gen)
        run_copy(backend, dsts, srcs)
        check_guarded(buf, dsts, srcs)


def test_non_contiguous_pairs_copied(backend):
    """Strided pairs fall back to torch; the elements a strided dst skips stay untouched."""
    gen = torch.Generator().manual_seed(3)
    for dtype in DTYPES:
        src_t = special_values(12 * 7, dtype, gen).reshape(12, 7).t()  # transposed source
        dst_t = poison_(torch.empty(7, 12, dtype=dtype))
        backing = poison_(torch.empty(2 * 301, dtype=dtype))
        dst_strided = backing[::2]  # every other element
        src_plain = special_values(301, dtype, gen)
        src_expand = special_values(1, dtype, gen).expand(5, 9)  # stride 0 source
        dst_expand = poison_(torch.empty(5, 9, dtype=dtype))
        src_ok = special_values(1000, dtype, gen)
        dst_ok = poison_(torch.empty(1000, dtype=dtype))
        run_copy(backend, [dst_t, dst_strided, dst_expand, dst_ok], [src_t, src_plain, src_expand, src_ok])
        assert_bitwise_equal(dst_t, src_t)
        assert_bitwise_equal(dst_strided, src_plain)
        assert_bitwise_equal(dst_expand, src_expand)
        assert_bitwise_equal(dst_ok, src_ok)
        assert torch.equal(bits(backing[1::2]), bits(poison_(torch.empty(301, dtype=dtype))))


def test_large_tensor_default_chunk(interpret):
    """Hundreds of default-size chunks, not a multiple of the chunk, among tiny tensors."""
    gen = torch.Generator().manual_seed(5)
    sizes = [3, 1_000_003, 1, 8191, 8193]
    srcs = [special_values(n, torch.float32, gen) for n in sizes]
    buf, dsts = make_guarded(sizes, torch.float32, gen)
    multi_tensor_copy_(dsts, srcs, backend="triton")
    check_guarded(buf, dsts, srcs)


def test_property_random_lists(interpret):
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=25, deadline=None, derandomize=True)
    @hypothesis.given(
        sizes=st.lists(st.integers(1, 200), min_size=1, max_size=12),
        dtype_idx=st.lists(st.integers(0, 2), min_size=12, max_size=12),
        block_bytes=st.sampled_from([16, 64, 256, 4096]),
        seed=st.integers(0, 2**16),
    )
    def check(sizes, dtype_idx, block_bytes, seed):
        gen = torch.Generator().manual_seed(seed)
        srcs = [special_values(n, DTYPES[dtype_idx[i]], gen) for i, n in enumerate(sizes)]
        dsts = [poison_(torch.empty_like(s)) for s in srcs]
        CopyPlan(dsts, srcs, backend="triton", chunk_bytes=block_bytes, max_programs=3).run()
        for d, s in zip(dsts, srcs):
            assert_bitwise_equal(d, s)

    check()


# --------------------------------------------------------------------------- behaviour


def test_launch_count_is_small(interpret):
    srcs = [torch.randn(n) for n in (10, 20, 30)] + [torch.randn(n).bfloat16() for n in (5, 6)]
    dsts = [torch.empty_like(s) for s in srcs]
    plan = CopyPlan(dsts, srcs, backend="triton")
    assert plan.launches == 1  # bytewise: one launch whatever the dtypes
    plan.run()
    assert all(torch.equal(d, s) for d, s in zip(dsts, srcs))


def test_triton_bumps_autograd_version(interpret):
    d, s = torch.zeros(10), torch.ones(10)
    before = d._version
    multi_tensor_copy_([d], [s], backend="triton")
    assert d._version > before


def test_copies_into_parameters_without_autograd_error(backend):
    p = torch.nn.Parameter(torch.zeros(5, 3))
    src = torch.randn(5, 3)
    run_copy(backend, [p], [src])
    assert torch.equal(p.detach(), src)


def test_triton_on_cpu_without_interpreter_refused(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        multi_tensor_copy_([torch.zeros(3)], [torch.ones(3)], backend="triton")


def test_auto_on_cpu_uses_torch(monkeypatch):
    calls = []
    monkeypatch.setattr(copy_mod.CopyPlan, "_build_fused", lambda *a, **k: calls.append(a))
    d, s = torch.zeros(4), torch.ones(4)
    multi_tensor_copy_([d], [s])
    assert calls == [] and torch.equal(d, s)


def test_import_does_not_load_triton():
    code = "import sys, megatie.kernels, torch; megatie.kernels.multi_tensor_copy_([torch.zeros(2)], [torch.ones(2)]); assert 'triton' not in sys.modules"
    env = dict(os.environ)
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("backend_name", ["torch", "auto", "triton"])
def test_validation_errors(backend_name):
    a = torch.zeros(6)
    bad = [
        ([a], [a, a]),  # count
        ([a], [torch.zeros(6, dtype=torch.float16)]),  # dtype
        ([a], [torch.zeros(2, 3)]),  # shape, same numel
        ([a], [torch.zeros(6, device="meta")]),  # device
        ([a], [[0.0] * 6]),  # not a tensor
    ]
    for dsts, srcs in bad:
        with pytest.raises(ValueError):
            multi_tensor_copy_(dsts, srcs, backend=backend_name)
    with pytest.raises(ValueError, match="unknown backend"):
        multi_tensor_copy_([a], [a], backend="cuda")


def test_empty_list_is_noop(backend):
    run_copy(backend, [], [])


def test_kernel_vectorises_for_cuda():
    """Compile the CUDA variants offline (no GPU needed) and count 16-byte accesses.

    The alignment hints make both the full-chunk and the masked last-chunk accesses 128-bit;
    a regression there costs most of the bandwidth while every correctness test still passes.
    """
    triton = pytest.importorskip("triton")
    from triton.runtime.jit import JITFunction

    from megatie.kernels import triton_copy as tc

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this Triton has no offline compile API")
    fn = JITFunction(tc._copy_kernel)
    sig = {"meta_ptr": "*i64", "n_tensors": "i32", "n_chunks": "i32", "search_steps": "i32",
           "WORD": "constexpr", "WORD_BYTES": "constexpr", "CHUNK": "constexpr", "VEC": "constexpr"}
    counts = {}
    for cls in (tc.VECTOR_BYTES, 8, 2):
        word_type, word = tc._WORDS[cls]
        consts = {"WORD": word_type, "WORD_BYTES": word, "CHUNK": tc.CHUNK_BYTES // word, "VEC": cls == tc.VECTOR_BYTES}
        try:
            compiled = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": tc.NUM_WARPS, "enable_fp_fusion": False})
        except Exception as exc:  # missing ptxas / backend in this install
            pytest.skip(f"offline CUDA compile unavailable: {exc!r}"[:200])
        ptx = compiled.asm["ptx"]
        counts[cls] = (len(re.findall(r"ld\.global[.\w]*\.v4", ptx)), len(re.findall(r"st\.global[.\w]*\.v4", ptx)))
    # Each thread moves CHUNK_BYTES / (32 * NUM_WARPS) bytes per chunk in 16-byte vectors,
    # once in the full-chunk branch and once in the masked one.
    per_branch = tc.CHUNK_BYTES // (32 * tc.NUM_WARPS * 16)
    assert counts[tc.VECTOR_BYTES] == (2 * per_branch, 2 * per_branch)
    assert counts[8] == counts[2] == (0, 0)  # misaligned classes must not assume alignment
