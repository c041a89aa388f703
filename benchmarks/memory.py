"""Peak and average training memory, conventional vs megatie, DeepSpeed ZeRO (the paper's Table 3).

Both variants train the same model with the same micro-batch, sequence length and activation
checkpointing setting through the DeepSpeed engine; each runs in its own processes so that one
run's allocator cache cannot inflate the other's figures. megatie runs the paper's agent
(``--tie-policy qlearning``). Reported per variant (see ``harness.py``):

- on CUDA: ``peak_bytes`` = the allocator's peak, folded across DeepSpeed's counter resets;
  ``peak_reserved_bytes``; NVML ``peak_sampled_bytes`` and ``avg_bytes`` (device memory in use);
- on CPU: peak / average RSS (interpreter and libraries included), and the tensor probe's
  ``peak_tensor_bytes`` / ``avg_tensor_bytes`` (where tying shows).

    python benchmarks/memory.py --quick --out benchmarks/results/memory_quick.json
    python benchmarks/memory.py --ds-config ds_configs/zero2_bf16.json --activation-checkpointing \
        --n-layer 48 --n-embd 1600 --n-head 16 --seq-len 256 --batch-size 16 --max-steps 40   # the paper's shape, GPU
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import POLICY, ROOT, SHAPE_FLAGS, side_by_side, write_json  # noqa: E402

DEFAULT = dict(n_layer=24, n_embd=384, n_head=6, seq_len=64, batch_size=4, vocab_size=512, max_steps=60,
               tie_every=15)
QUICK = dict(DEFAULT, n_embd=256, n_head=4, max_steps=16, tie_every=4)
RATIO_KEYS = ("peak_memory_bytes", "avg_memory_bytes", "peak_tensor_bytes", "avg_tensor_bytes",
              "peak_reserved_bytes", "peak_sampled_bytes")


def add_shape_flags(p: argparse.ArgumentParser, defaults: dict) -> None:
    for key in SHAPE_FLAGS:
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"default {defaults[key]}")
    p.add_argument("--activation-checkpointing", action="store_true", help="for both variants")
    p.add_argument("--ds-config", default=os.path.join(ROOT, "ds_configs", "zero2.json"))
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--cache-dir", default=None, help="tokenizer / token-shard cache (default: megatie's)")
    p.add_argument("--out", default=None, help="JSON result file")


def settings_from(args, defaults: dict) -> dict:
    settings = dict(defaults)
    settings.update({k: getattr(args, k) for k in SHAPE_FLAGS if getattr(args, k) is not None})
    settings["activation_checkpointing"] = bool(args.activation_checkpointing)
    if args.cache_dir:
        settings["cache_dir"] = args.cache_dir
    return settings


def ratios(conv: dict, mega: dict) -> dict:
    return {k: conv[k] / mega[k] for k in RATIO_KEYS if conv.get(k) and mega.get(k)}


def variant_names(results: dict) -> list[str]:
    return [name for name in POLICY if name in results]


def print_table(results: dict) -> None:
    mb, gpu = 2 ** 20, results["conventional"]["device"].startswith("cuda")
    cols = (("peak alloc MB", "peak_memory_bytes"), ("peak reserved MB", "peak_reserved_bytes"),
            ("NVML peak MB", "peak_sampled_bytes"), ("NVML avg MB", "avg_memory_bytes")) if gpu else (
        ("peak RSS MB", "peak_memory_bytes"), ("avg RSS MB", "avg_memory_bytes"),
        ("peak tensor MB", "peak_tensor_bytes"), ("avg tensor MB", "avg_tensor_bytes"))
    print(f"{'':14}" + "".join(f"{name:>18}" for name, _ in cols) + f"{'tok/s':>10}")
    for name in variant_names(results):
        r = results[name]
        print(f"{name:14}" + "".join(f"{(r.get(k) or 0) / mb:18.1f}" for _, k in cols) + f"{r['tokens_per_second']:10.0f}")
    for name, ratio in results["ratio_conventional_over"].items():
        print(f"conventional / {name}: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items()))


def run(settings: dict, ds_config: str, seed: int, variants=("conventional", "megatie")) -> dict:
    t0 = time.perf_counter()
    results = side_by_side(settings, ds_config, seed, variants=("conventional", *(v for v in variants
                                                                                 if v != "conventional")))
    results["ratio_conventional_over"] = {name: ratios(results["conventional"], results[name])
                                          for name in variant_names(results) if name != "conventional"}
    if "megatie" in results:  # the key earlier results carry
        results["ratio_conventional_over_megatie"] = results["ratio_conventional_over"]["megatie"]
    results["settings"] = settings
    results["ds_config"] = os.path.relpath(os.path.abspath(ds_config), ROOT)
    results["benchmark_wall_s"] = time.perf_counter() - t0
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="short run (under 5 minutes on a 2-core CPU)")
    p.add_argument("--variants", default="conventional,megatie",
                   help=f"comma-separated, each beside conventional: {', '.join(POLICY)}")
    add_shape_flags(p, DEFAULT)
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(POLICY))
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(POLICY)}")
    results = run(settings_from(args, QUICK if args.quick else DEFAULT), args.ds_config, args.seed, variants)
    write_json(args.out, results)
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
