"""Benchmark the multi-tensor copy paths on GPT-2 blocks (issue 5).

Copies one GPT-2-XL block (d=1600) and one GPT-2-small block (d=768), in bf16 and fp32, and a
bf16 block together with its fp32 master copy and both Adam moments (the ZeRO replicate case),
and reports achieved bandwidth (bytes read + bytes written per second), side by side with one
contiguous copy of the same number of bytes (the ceiling), for:

- fused:   multi_tensor_copy_(backend="triton"): plans (builds and uploads the table) per call
- plan:    CopyPlan(..., backend="triton").run() on a plan built once per buffer set
- auto:    multi_tensor_copy_(...) with its default backend choice
- foreach: torch._foreach_copy_ on the whole list
- loop:    one dst.copy_(src) per tensor

On CUDA: CUDA events, warm-up, median of many samples, each sample a pass over several
rotating buffer sets (together well beyond L2, so small copies are not served from cache);
each method's host time per call (enqueue only, no synchronisation) is reported too. Without
CUDA the Triton rows (fused, plan) are refused and the torch paths are timed on the CPU with
time.perf_counter, for ratios only.

--host-overhead times a warm plan's run() on the host alone. On CUDA that is the real call;
on a CPU the plan is built under the Triton interpreter and its launcher replaced by a no-op,
so the figure is the Python around the launch, without Triton's launcher or the driver.

    python benchmarks/copy_kernel.py [--quick] [--out results.json] [--only NAME] [--host-overhead]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

# Methods that launch the Triton kernel: measured only on CUDA.
GPU_ONLY = ("fused", "plan")


def gpt2_block_shapes(d: int):
    """Parameter shapes of one GPT-2 block (HF Conv1D layout), 12 tensors."""
    return [
        (d,), (d,),              # ln_1 weight, bias
        (d, 3 * d), (3 * d,),    # attn.c_attn
        (d, d), (d,),            # attn.c_proj
        (d,), (d,),              # ln_2 weight, bias
        (d, 4 * d), (4 * d,),    # mlp.c_fc
        (4 * d, d), (d,),        # mlp.c_proj
    ]


def scenarios():
    for name, d in (("gpt2-xl", 1600), ("gpt2-small", 768)):
        shapes = gpt2_block_shapes(d)
        yield f"{name} block bf16", d, [(s, torch.bfloat16) for s in shapes]
        yield f"{name} block fp32", d, [(s, torch.float32) for s in shapes]
        # bf16 weights + fp32 master + exp_avg + exp_avg_sq: 48 tensors, two element sizes.
        yield (f"{name} bf16 block+fp32 master+Adam m,v", d,
               [(s, torch.bfloat16) for s in shapes] + [(s, torch.float32) for s in shapes] * 3)


def build_sets(spec, device, rotate, fill=True):
    sets = []
    for _ in range(rotate):
        srcs = [(torch.randn(shape, device=device) if fill else torch.empty(shape, device=device)).to(dtype)
                for shape, dtype in spec]
        dsts = [torch.empty_like(s) for s in srcs]
        sets.append((dsts, srcs))
    return sets


def nbytes(spec):
    total = 0
    for shape, dtype in spec:
        n = 1
        for s in shape:
            n *= s
        total += n * torch.empty((), dtype=dtype).element_size()
    return total


def time_cuda(fn, sets, warmup, samples):
    for i in range(warmup):
        fn(*sets[i % len(sets)])
    torch.cuda.synchronize()
    times = []
    for _ in range(samples):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for dsts, srcs in sets:
            fn(dsts, srcs)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(sets))
    return statistics.median(times)


def time_cpu(fn, sets, warmup, samples):
    for i in range(warmup):
        fn(*sets[i % len(sets)])
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        for dsts, srcs in sets:
            fn(dsts, srcs)
        times.append((time.perf_counter() - t0) / len(sets))
    return statistics.median(times)


def host_seconds(fn, sets, calls):
    """Median host time of one call, without waiting for the device (enqueue cost)."""
    times = []
    for i in range(calls):
        dsts, srcs = sets[i % len(sets)]
        t0 = time.perf_counter()
        fn(dsts, srcs)
        times.append(time.perf_counter() - t0)
        if i % 8 == 7:
            torch.cuda.synchronize()  # never let the launch queue fill and block the host
    torch.cuda.synchronize()
    return statistics.median(times)


def make_methods(sets, cuda):
    from megatie.kernels import CopyPlan, multi_tensor_copy_

    methods = {}
    if cuda:
        plans = {id(dsts): CopyPlan(dsts, srcs, backend="triton") for dsts, srcs in sets}
        methods["fused"] = lambda ds, ss: multi_tensor_copy_(ds, ss, backend="triton")
        methods["plan"] = lambda ds, ss: plans[id(ds)].run()
    methods["auto"] = lambda ds, ss: multi_tensor_copy_(ds, ss)
    methods["foreach"] = lambda ds, ss: torch._foreach_copy_(ds, ss)
    methods["loop"] = lambda ds, ss: [d.copy_(s) for d, s in zip(ds, ss)]
    return methods


def run_scenario(name, d, spec, device, cfg):
    size = nbytes(spec)
    rotate = max(2, -(-cfg["rotate_bytes"] // (2 * size)))
    sets = build_sets(spec, device, rotate)
    flat = [([torch.empty(size, dtype=torch.uint8, device=device)],
             [torch.empty(size, dtype=torch.uint8, device=device)]) for _ in range(rotate)]
    row = {"scenario": name, "d": d, "tensors": len(spec), "bytes_per_copy": size, "rotating_sets": rotate}
    timer, warmup, samples = cfg["timer"], cfg["warmup"], cfg["samples"]
    t_ceiling = timer(lambda ds, ss: ds[0].copy_(ss[0]), flat, warmup, samples)
    row["ceiling"] = {"seconds": t_ceiling, "GBps": 2 * size / t_ceiling / 1e9}
    for mname, fn in make_methods(sets, cfg["cuda"]).items():
        t = timer(fn, sets, warmup, samples)
        gbps = 2 * size / t / 1e9
        row[mname] = {"seconds": t, "GBps": gbps, "pct_of_ceiling": 100 * gbps / row["ceiling"]["GBps"]}
        if cfg["cuda"]:
            row[mname]["host_us"] = 1e6 * host_seconds(fn, sets, 4 * samples)
    for dsts, srcs in sets:  # every method must have produced an exact copy
        assert all(torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8))
                   for x, y in zip(dsts, srcs)), name
    return row


def print_row(row, methods):
    cells = [f"{row['ceiling']['GBps']:12.1f}"]
    for m in methods:
        cells.append(f"{row[m]['GBps']:7.1f} {row[m]['pct_of_ceiling']:3.0f}%" if m in row else f"{'-':>12s}")
    hosts = [f"{row[m]['host_us']:6.1f}" for m in methods if "host_us" in row.get(m, {})]
    host = ("   host us: " + " ".join(hosts)) if hosts else ""
    print(f"{row['scenario']:44s} {row['bytes_per_copy'] / 2**20:7.1f} {row['tensors']:4d} " + " ".join(cells) + host)


def host_overhead(cuda, samples):
    """Host time of a warm plan's run() on the gpt2-small mixed list (48 tensors)."""
    from megatie.kernels import CopyPlan

    _, _, spec = [s for s in scenarios() if "small bf16 block+" in s[0]][0]
    device = torch.device("cuda" if cuda else "cpu")
    (dsts, srcs), = build_sets(spec, device, 1, fill=False)
    plan = CopyPlan(dsts, srcs, backend="triton")
    if cuda:
        plan.run()
        torch.cuda.synchronize()
        what = "warm CopyPlan.run() on CUDA, enqueue only (Triton launcher + driver included)"
    else:
        for launch in (launch for fused in plan._fused for launch in fused.launches):
            stub = type("Stub", (), {"run": staticmethod(lambda *a: None), "function": 0, "packed_metadata": 0})
            launch.capture(stub, lambda index: 0, None)
        what = "warm CopyPlan.run() with a no-op launcher (Python only: Triton's launcher and the driver excluded)"
    times = []
    for i in range(samples):
        t0 = time.perf_counter()
        plan.run()
        times.append(time.perf_counter() - t0)
        if cuda and i % 8 == 7:
            torch.cuda.synchronize()
    bumps = []
    for _ in range(samples):  # the part of run() spent telling autograd about the writes
        t0 = time.perf_counter()
        torch.autograd.graph.increment_version(plan._bump)
        bumps.append(time.perf_counter() - t0)
    print(f"{what}: median {1e6 * statistics.median(times):.2f} us, min {1e6 * min(times):.2f} us over "
          f"{samples} calls; {len(dsts)} tensors, {plan.launches} launch(es); of which the version bump "
          f"{1e6 * statistics.median(bumps):.2f} us (median)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few samples (smoke run)")
    ap.add_argument("--out", help="write results as JSON to this file")
    ap.add_argument("--only", default="", help="run only scenarios whose name contains this")
    ap.add_argument("--host-overhead", action="store_true", help="only time a warm plan's run() on the host")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    if args.host_overhead:
        if not cuda:
            # Must be in the environment before the kernel is first decorated.
            os.environ["TRITON_INTERPRET"] = "1"
        host_overhead(cuda, 2000 if args.quick else 20000)
        return
    from megatie.kernels import AUTO_TRITON_MIN_BYTES

    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        dev_name = torch.cuda.get_device_name(device)
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
        cfg = {"rotate_bytes": max(8 * l2, 256 << 20), "timer": time_cuda}  # src + dst far beyond L2
        cfg["warmup"], cfg["samples"] = (3, 10) if args.quick else (10, 50)
    else:
        dev_name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        cfg = {"rotate_bytes": 128 << 20, "timer": time_cpu}  # beyond last-level cache on common CPUs
        cfg["warmup"], cfg["samples"] = (1, 3) if args.quick else (3, 15)
    cfg["cuda"] = cuda
    methods = [*GPU_ONLY, "auto", "foreach", "loop"]

    print(f"device: {dev_name}; torch {torch.__version__}; auto uses Triton from {AUTO_TRITON_MIN_BYTES} bytes")
    if not cuda:
        print("no CUDA device: the Triton rows (fused, plan) are not measured; CPU timings of the torch paths only")
    print(f"{'scenario':44s} {'MB':>7s} {'tens':>4s} " + " ".join(f"{m:>12s}" for m in ["ceiling", *methods])
          + "   (GB/s read+write; % of ceiling)")
    results = []
    for name, d, spec in scenarios():
        if args.only in name:
            row = run_scenario(name, d, spec, device, cfg)
            row["device"] = dev_name
            print_row(row, methods)
            results.append(row)
    if cuda:
        print("goals: plan >= 90% of ceiling for the gpt2-xl block; plan at least as fast as foreach everywhere")
    if args.out:
        payload = {"device": dev_name, "cuda": cuda, "torch": torch.__version__, "python": sys.version.split()[0],
                   "quick": args.quick, "gpu_figures": cuda, "auto_triton_min_bytes": AUTO_TRITON_MIN_BYTES,
                   "note": None if cuda else "CPU timings of the torch paths only; Triton rows need a CUDA device",
                   "results": results}
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
