"""What one gradient probe of the `split` policy costs in memory: exact (every block's gradient at once)
against count-sketched (one gradient alive at a time), side by side on the same model and batch.

Each variant runs in a fresh process; the figure is the peak of CUDA's allocator during the probe above
what was allocated before it (GPU) or, on a CPU, the process's peak resident memory during the probe
above its resident memory before it (Linux: the peak is reset through /proc/self/clear_refs, and large
allocations are returned to the system when freed, so resident memory follows live tensors). Also
reported: how far the sketched cosines between blocks are from the exact ones.

    OMP_NUM_THREADS=2 python benchmarks/probe_memory.py --n-layer 24 --n-embd 512 --out probe_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _status_bytes(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # VmHWM := VmRSS


def measure(args) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from megatie.tying.gradient_probe import block_gradient_gram
    from megatie.tying.layers import LayerTying

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=args.n_layer, n_embd=args.n_embd, n_head=8, n_positions=args.seq_len, vocab_size=8192)
    model = GPT2LMHeadModel(cfg).to(device)
    tying = LayerTying(model)
    tying.initialize([0] * args.n_layer)  # split's start: every block on block 0's tensors
    ids = torch.randint(0, 8192, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(1)).to(device)
    limit = 0 if args.variant == "sketched" else 1 << 62
    block_gradient_gram(model, tying, {"input_ids": ids, "labels": ids}, exact_limit_bytes=limit)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _status_bytes("VmRSS")
        _reset_peak_rss()
    gram = block_gradient_gram(model, tying, {"input_ids": ids, "labels": ids}, exact_limit_bytes=limit)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = _status_bytes("VmHWM") - before
    block = sum(t.numel() for t in tying.block_tensors(0))
    return {"variant": args.variant, "device": device.type, "block_params": block,
            "all_block_grads_bytes": args.n_layer * block * 4, "probe_peak_bytes": peak, "gram": gram.tolist()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-layer", type=int, default=24)
    p.add_argument("--n-embd", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--variant", choices=("exact", "sketched"), help=argparse.SUPPRESS)
    p.add_argument("--out", default="probe_memory.json")
    args = p.parse_args(argv)
    if args.variant:  # one measurement, in this fresh process
        print(json.dumps(measure(args)))
        return 0
    import torch

    rows = {}
    for variant in ("exact", "sketched"):
        cmd = [sys.executable, __file__, "--variant", variant, "--n-layer", str(args.n_layer), "--n-embd",
               str(args.n_embd), "--seq-len", str(args.seq_len), "--batch", str(args.batch)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT,
                             env=dict(os.environ, PYTHONPATH=ROOT, MALLOC_MMAP_THRESHOLD_="65536")).stdout
        rows[variant] = json.loads(out.strip().splitlines()[-1])
    grams = {v: torch.tensor(r.pop("gram"), dtype=torch.float64) for v, r in rows.items()}
    cos = {v: g / (g.diagonal().sqrt()[:, None] * g.diagonal().sqrt()[None, :]) for v, g in grams.items()}
    error = float((cos["sketched"] - cos["exact"]).abs().max())
    print(f"{args.n_layer} blocks of {rows['exact']['block_params'] / 1e6:.2f}M; all block gradients "
          f"{rows['exact']['all_block_grads_bytes'] / 2**20:.0f} MiB (fp32); device {rows['exact']['device']}")
    print(f"{'probe':<10}{'peak above before (MiB)':>26}")
    for v, r in rows.items():
        print(f"{v:<10}{r['probe_peak_bytes'] / 2**20:>26.0f}")
    print(f"largest cosine difference, sketched vs exact: {error:.4f}")
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"settings": vars(args), "rows": rows, "max_cosine_error": error}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
