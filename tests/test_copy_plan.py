"""Tests for megatie.kernels.CopyPlan and the persistent bytewise Triton copy kernel.

The kernel runs on CPU tensors through the Triton interpreter (the very kernel that runs on
CUDA, launched the same way). Small ``chunk_bytes`` and ``max_programs`` make small tensors
cross many chunks, tensors and programs, so every boundary is exercised cheaply. Every layout
is carved out of poisoned byte arenas, so a byte written outside a destination is caught too.
"""

import types

import pytest
import torch

from megatie.kernels import CopyPlan
from megatie.kernels import copy as copy_mod

POISON = 0xA5


def carve(layout, seed=0):
    """(dst arena, dsts, srcs) for ``layout`` = [(dtype, numel, src byte offset, dst byte offset)].

    Each pair lives at the given offsets (mod 64) in its own 64-byte-aligned stretch of two byte
    arenas; sources hold random bytes, destinations the poison pattern.
    """
    gen = torch.Generator().manual_seed(seed)
    sizes = [n * torch.empty((), dtype=dt).element_size() for dt, n, _, _ in layout]
    spans = [64 * (2 + (nb + 63) // 64) for nb in sizes]
    total = sum(spans) + 64
    src_arena = torch.randint(0, 256, (total,), dtype=torch.uint8, generator=gen)
    dst_arena = torch.full((total,), POISON, dtype=torch.uint8)
    base = -dst_arena.data_ptr() % 64  # both arenas' stretches start 64-byte aligned
    sbase = -src_arena.data_ptr() % 64
    dsts, srcs = [], []
    for (dtype, n, so, do), nb, span in zip(layout, sizes, spans):
        srcs.append(src_arena[sbase + so : sbase + so + nb].view(dtype))
        dsts.append(dst_arena[base + do : base + do + nb].view(dtype))
        base, sbase = base + span, sbase + span
    return dst_arena, dsts, srcs


def check(dst_arena, dsts, srcs):
    """Every destination holds its source's bytes; every other byte is still poison."""
    expected = torch.full_like(dst_arena, POISON)
    for d, s in zip(dsts, srcs):
        start = d.data_ptr() - dst_arena.data_ptr()
        expected[start : start + s.numel() * s.element_size()] = s.reshape(-1).view(torch.uint8)
    bad = (dst_arena != expected).nonzero().flatten()
    assert bad.numel() == 0, f"{bad.numel()} wrong bytes, first at arena offset {bad[:8].tolist()}"


def run_plan(layout, chunk_bytes=64, max_programs=5, seed=0):
    arena, dsts, srcs = carve(layout, seed)
    plan = CopyPlan(dsts, srcs, backend="triton", chunk_bytes=chunk_bytes, max_programs=max_programs)
    plan.run()
    check(arena, dsts, srcs)
    return plan


# --------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_single_dtype_aligned_one_launch(interpret, dtype):
    layout = [(dtype, n, 0, 0) for n in (1, 4, 8, 9, 64, 100, 257)]
    assert run_plan(layout).launches == 1


def test_mixed_dtypes_share_one_launch(interpret):
    dtypes = [torch.bfloat16, torch.float32, torch.int8, torch.float64, torch.bool, torch.complex64]
    layout = [(dtypes[i % len(dtypes)], n, 0, 0) for i, n in enumerate((3, 17, 40, 5, 33, 12, 1, 90))]
    assert run_plan(layout, max_programs=3).launches == 1


def test_tails_of_every_length(interpret):
    """Byte counts 1..48: every tail length 0..15 after zero to two whole 16-byte vectors."""
    layout = [(torch.int8, n, 0, 0) for n in range(1, 49)]
    run_plan(layout, chunk_bytes=16, max_programs=7)
    layout = [(torch.bfloat16, n, 0, 0) for n in (1, 3, 5, 7, 9, 15, 17, 23)]
    run_plan(layout, chunk_bytes=32, max_programs=4)


def test_chunk_multiples_with_and_without_tail(interpret):
    """A body that fills its chunks exactly: the tail (if any) needs a chunk of its own."""
    layout = [(torch.int8, n, 0, 0) for n in (64, 65, 79, 128, 143, 144, 16, 15)]
    run_plan(layout, chunk_bytes=64, max_programs=3)


@pytest.mark.parametrize("offsets", [(0, 1), (1, 0), (3, 5), (0, 2), (2, 2), (0, 4), (4, 12), (8, 8)])
def test_misaligned_offsets(interpret, offsets):
    """Views at byte offsets that rule out 16-byte vectors: narrower words, one launch per width."""
    so, do = offsets
    dtypes = [dt for dt in (torch.int8, torch.bfloat16, torch.float32, torch.float64)
              if so % dt.itemsize == 0 and do % dt.itemsize == 0]
    layout = [(dt, n, so, do) for dt in dtypes for n in (1, 7, 33, 130)]
    layout += [(torch.float32, 50, 0, 0)]  # an aligned pair alongside
    run_plan(layout, chunk_bytes=32, max_programs=4)


def test_word_classes():
    from megatie.kernels.triton_copy import word_class

    cases = {(0, 0): 16, (32, 64): 16, (16, 8): 8, (8, 24): 8, (4, 0): 4, (12, 4): 4,
             (2, 16): 2, (6, 2): 2, (1, 0): 1, (16, 17): 1, (3, 5): 1}
    assert {k: word_class(*k) for k in cases} == cases


def test_table_rows():
    """Vector bodies are whole 16-byte vectors (the kernel's mask hint relies on it), tails are
    shorter than one, every tensor owns at least one chunk, and the sentinel closes the table."""
    from megatie.kernels.triton_copy import _WORDS, _rows

    sizes = [1, 15, 16, 17, 63, 64, 65, 80, 1000, 4096, 4097]
    for cls in (16, 8, 4, 2, 1):
        word = _WORDS[cls][1]
        for chunk_bytes in (16, 64, 256):
            rows, chunks = _rows([(0, 0, n) for n in sizes], cls, chunk_bytes // word)
            _, _, body, tail, first = rows
            assert [b * word + t for b, t in zip(body, tail)][:-1] == sizes
            assert all(t < cls and (b * word) % cls == 0 for b, t in zip(body, tail))
            owned = [b - a for a, b in zip(first, first[1:])]
            assert owned == [-(-(b * word) // chunk_bytes) + (b * word % chunk_bytes == 0 and t > 0)
                             for b, t in zip(body[:-1], tail[:-1])]
            assert min(owned) >= 1 and first[0] == 0 and first[-1] == chunks


def test_large_tensor_among_small_ones(interpret):
    """One tensor of hundreds of chunks spread over several programs, between tiny ones."""
    layout = [(torch.float32, 3, 0, 0), (torch.float32, 10_007, 0, 0), (torch.bfloat16, 1, 0, 0),
              (torch.bfloat16, 2_051, 0, 0)]
    run_plan(layout, chunk_bytes=128, max_programs=7)


def test_many_tensors_every_search_depth(interpret):
    """Tensor and program counts around powers of two: every depth of the start search."""
    for count, programs in [(1, 1), (2, 3), (3, 2), (5, 8), (9, 4), (17, 16), (64, 5), (130, 33)]:
        layout = [(torch.float32, 1 + (7 * k) % 11, 0, 0) for k in range(count)]
        run_plan(layout, chunk_bytes=16, max_programs=programs, seed=count)


def test_more_programs_than_chunks(interpret):
    plan = run_plan([(torch.float32, 5, 0, 0), (torch.int8, 3, 0, 0)], chunk_bytes=16, max_programs=64)
    assert [launch.grid for launch in plan._fused[0].launches] == [3]  # 16 + 4 bytes, then 3 bytes


def test_default_chunk_size(interpret):
    run_plan([(torch.float32, 5000, 0, 0), (torch.bfloat16, 13, 0, 0)], chunk_bytes=None, max_programs=None)


def test_strided_pairs_go_to_foreach(interpret):
    src_t = torch.randn(12, 7).t()  # transposed source
    backing = torch.zeros(2 * 30)
    dst_strided = backing[::2]
    dsts, srcs = [torch.empty(7, 12), dst_strided, torch.empty(40)], [src_t, torch.randn(30), torch.randn(40)]
    plan = CopyPlan(dsts, srcs, backend="triton", chunk_bytes=64)
    assert plan.launches == 2  # one kernel launch, one foreach call
    plan.run()
    assert all(torch.equal(d, s) for d, s in zip(dsts, srcs))
    assert torch.equal(backing[1::2], torch.zeros(30))


def test_conjugate_view_is_resolved(interpret):
    src = torch.randn(9, dtype=torch.complex64).conj()
    dst = torch.empty(9, dtype=torch.complex64)
    CopyPlan([dst], [src], backend="triton", chunk_bytes=16).run()
    assert torch.equal(dst, src.resolve_conj())


# --------------------------------------------------------------------------- plan behaviour


@pytest.mark.parametrize("backend", ["triton", "torch", "auto"])
def test_plan_reuse_sees_new_source_values(interpret, backend):
    srcs = [torch.randn(n) for n in (10, 300)] + [torch.randn(33).bfloat16()]
    dsts = [torch.empty_like(s) for s in srcs]
    plan = CopyPlan(dsts, srcs, backend=backend, chunk_bytes=64)
    for step in range(3):
        for s in srcs:
            s.add_(1.0)  # same storage, new values
        plan.run()
        assert all(torch.equal(d, s) for d, s in zip(dsts, srcs)), step


def test_plan_bumps_versions_and_writes_parameters(interpret):
    p = torch.nn.Parameter(torch.zeros(5, 3))
    src = torch.randn(5, 3)
    before = p._version
    CopyPlan([p], [src], backend="triton", chunk_bytes=16).run()
    assert torch.equal(p.detach(), src) and p._version > before
    assert not p.grad_fn and p.requires_grad


@pytest.mark.parametrize("what", ["shape", "dtype", "device", "count", "not a tensor"])
def test_plan_refuses_mismatched_pairs(what):
    a = torch.zeros(6)
    other = {"shape": torch.zeros(2, 3), "dtype": torch.zeros(6, dtype=torch.float16),
             "device": torch.zeros(6, device="meta"), "count": None, "not a tensor": [0.0] * 6}[what]
    srcs = [a, a] if what == "count" else [other]
    with pytest.raises(ValueError) as info:
        CopyPlan([a], srcs)
    message = str(info.value)
    assert message.startswith("CopyPlan: ") and "\n" not in message
    assert what.split()[0] in message or what == "count" and "2 sources" in message


def test_plan_refuses_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        CopyPlan([], [], backend="cuda")


@pytest.mark.parametrize("backend", ["triton", "torch", "auto"])
def test_empty_lists(interpret, backend):
    CopyPlan([], [], backend=backend).run()
    d = torch.empty(0, 3)
    plan = CopyPlan([d, torch.empty(0)], [torch.empty(0, 3), torch.empty(0)], backend=backend)
    assert plan.launches == 0
    plan.run()


def test_torch_backend_one_foreach_per_dtype(monkeypatch):
    calls = []
    real = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda ds, ss: (calls.append({d.dtype for d in ds}), real(ds, ss)))
    srcs = [torch.randn(4), torch.randn(3).bfloat16(), torch.randn(2), torch.randn(5).bfloat16()]
    dsts = [torch.empty_like(s) for s in srcs]
    CopyPlan(dsts, srcs, backend="torch").run()
    assert calls == [{torch.float32}, {torch.bfloat16}]
    assert all(torch.equal(d, s) for d, s in zip(dsts, srcs))


def test_warm_run_replays_through_the_captured_launcher(interpret):
    """After the first launch a plan replays via the compiled kernel's launcher (a stub here:
    the CPU has no CUDA launcher), with the grid and arguments of the first launch."""
    srcs = [torch.randn(40), torch.randn(7).bfloat16()]
    dsts = [torch.empty_like(s) for s in srcs]
    plan = CopyPlan(dsts, srcs, backend="triton", chunk_bytes=32, max_programs=3)
    (launch,) = plan._fused[0].launches
    calls = []
    fake = types.SimpleNamespace(run=lambda *a: calls.append(a), function="fn", packed_metadata="meta")
    launch.capture(fake, lambda index: f"stream{index}", None)
    versions = [d._version for d in dsts]
    plan.run()
    assert calls == [(3, 1, 1, "streamNone", "fn", "meta", None, None, None, *launch.args)]
    assert [d._version for d in dsts] > versions


def test_auto_threshold(monkeypatch):
    """auto: Triton only for CUDA lists of at least AUTO_TRITON_MIN_BYTES (fake CUDA tensors)."""
    triton_copy = pytest.importorskip("megatie.kernels.triton_copy")
    monkeypatch.setattr(triton_copy, "interpreter_active", lambda: False)

    def fake(nbytes, kind="cuda"):
        return types.SimpleNamespace(device=torch.device(kind), numel=lambda: nbytes // 2, element_size=lambda: 2)

    limit = copy_mod.AUTO_TRITON_MIN_BYTES
    assert copy_mod._auto_uses_triton([fake(limit // 2), fake(limit // 2)])
    assert not copy_mod._auto_uses_triton([fake(limit // 2), fake(limit // 2 - 2)])
    assert not copy_mod._auto_uses_triton([fake(limit), fake(2, "cpu")])
    monkeypatch.setattr(triton_copy, "interpreter_active", lambda: True)
    assert not copy_mod._auto_uses_triton([fake(2 * limit)])
