"""Peak and average training memory, conventional vs megatie, ZeRO-2 (the paper's Table 3).

Both variants train the same model with the same micro-batch and sequence length through the
DeepSpeed engine; each runs in its own process so that one run's allocator cache cannot inflate
the other's figures. Reported per variant:

- ``peak_bytes`` / ``avg_bytes``: on CUDA ``torch.cuda.max_memory_allocated`` (peak) and NVML
  device memory sampled by a thread (average), ``peak_reserved_bytes`` too; on CPU the process's
  resident set size (RSS) sampled by a thread. RSS includes the interpreter and libraries (torch,
  DeepSpeed, transformers: several hundred MB that no tying can remove), so on CPU also
- ``peak_tensor_bytes`` / ``avg_tensor_bytes``: bytes of the tensors reachable from the model and
  the engine (parameters, gradients, fp32 masters, Adam moments, ZeRO buffers; during a regroup
  also the carried state), measured after every backward and every rebuild,
  when activations are gone - where tying shows.

    python benchmarks/memory.py --quick --out benchmarks/results/memory_quick.json
    python benchmarks/memory.py            # the default configuration, longer

A variant can be run alone with ``--variant conventional|megatie`` (used internally).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEFAULT = dict(n_layer=24, n_embd=384, n_head=6, seq_len=64, batch_size=4, vocab_size=512, max_steps=60,
               tie_every=15)
QUICK = dict(DEFAULT, n_embd=256, n_head=4, max_steps=16, tie_every=4)
POLICY = {"conventional": "conventional", "megatie": "qlearning"}


def live_tensor_bytes(*roots) -> int:
    """Bytes of every distinct tensor storage reachable from ``roots`` (the model, the engine, the
    carried state). Follows containers and instance attributes, not modules, classes or functions,
    so library globals are not counted; parameter gradients are followed explicitly."""
    import types

    import torch

    skip = (types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
            types.FrameType, types.CodeType, str, bytes, int, float)
    seen_obj, seen_storage, total = set(), set(), 0
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen_obj or isinstance(obj, skip):
            continue
        seen_obj.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.grad is not None:
                stack.append(obj.grad)
            if obj.is_meta:
                continue
            storage = obj.untyped_storage()
            key = (storage.device.type, storage.data_ptr())
            if storage.data_ptr() and key not in seen_storage:
                seen_storage.add(key)
                total += storage.nbytes()
            continue
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__"):
            stack.append(vars(obj))
    return total


def run_variant(variant: str, settings: dict, ds_config: str, out_dir: str, seed: int) -> dict:
    import torch
    import torch.distributed as tdist

    from megatie.cli import build_parser, config_from_args, init_deepspeed_distributed
    from megatie.trainer import Trainer
    from megatie.zero import DeepSpeedEngine

    rank, world, device = init_deepspeed_distributed()
    samples: list[int] = []
    probe = settings.get("probe", True)

    class ProbedEngine(DeepSpeedEngine):
        """The DeepSpeed engine, with a tensor-bytes probe at the points of highest state memory."""

        def after_backward(self):
            samples.append(live_tensor_bytes(self.model, self.engine))  # gradients exist, activations freed

        def _build(self, groups, carry_of, counters):
            super()._build(groups, carry_of, counters)
            # The new engine is built while the carried state is still alive: the regroup's peak.
            samples.append(live_tensor_bytes(self.model, self.engine, carry_of))

    s = settings
    argv = ["--out-dir", out_dir, "--tie-policy", POLICY[variant], "--seed", str(seed), "--no-progress",
            "--max-steps", str(s["max_steps"]), "--tie-every", str(s["tie_every"]),
            "--n-layer", str(s["n_layer"]), "--n-embd", str(s["n_embd"]), "--n-head", str(s["n_head"]),
            "--seq-len", str(s["seq_len"]), "--batch-size", str(s["batch_size"]),
            "--vocab-size", str(s["vocab_size"]), "--eval-every", str(10 ** 6), "--eval-batches", "2",
            "--checkpoint-every", str(10 ** 6), "--log-every", str(10 ** 6)]
    cfg = config_from_args(build_parser().parse_args(argv))
    engine_class = ProbedEngine if probe else DeepSpeedEngine  # timing runs go unprobed
    trainer = Trainer(cfg, rank=rank, world_size=world, barrier=tdist.barrier, device=device,
                      engine_factory=lambda m, c, d: engine_class(m, c, d, ds_config=ds_config))
    t0 = time.perf_counter()
    summary = trainer.train()
    wall = time.perf_counter() - t0
    result = {
        "peak_bytes": summary["peak_memory_bytes"], "avg_bytes": summary["avg_memory_bytes"],
        "memory_source": summary["memory_source"],
        "peak_tensor_bytes": max(samples, default=0), "avg_tensor_bytes": int(sum(samples) / max(len(samples), 1)),
        "tensor_samples": len(samples),
        "mean_trainable_params": summary["mean_trainable_params"],
        "final_trainable_params": summary["final_trainable_params"],
        "conventional_trainable_params": summary["conventional_trainable_params"],
        "mean_independent_layers": summary["mean_independent_layers"],
        "tokens_per_second": summary["tokens_per_second"], "steps": summary["steps"],
        "regroups": trainer.engine.regroups, "regroup_seconds": trainer.engine.regroup_seconds,
        "train_time_s": summary["train_time_s"], "wall_s": wall, "world_size": world,
        "device": str(device),
    }
    if device.type == "cuda":
        result["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved(device))
    tdist.destroy_process_group()
    return result


def run_side_by_side(settings: dict, ds_config: str, seed: int, variants=("conventional", "megatie")) -> dict:
    """Each variant in a fresh process (single rank; use the deepspeed launcher for more)."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            out = os.path.join(tmp, f"{variant}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--ds-config", ds_config,
                   "--seed", str(seed), "--out", out, "--settings", json.dumps(settings)]
            env = {k: v for k, v in os.environ.items()
                   if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{variant} run failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
            with open(out) as f:
                results[variant] = json.load(f)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="short run (under 5 minutes on a 2-core CPU)")
    p.add_argument("--ds-config", default=os.path.join(ROOT, "ds_configs", "zero2.json"))
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", default=None, help="JSON result file")
    p.add_argument("--variant", choices=sorted(POLICY), help=argparse.SUPPRESS)
    p.add_argument("--settings", help=argparse.SUPPRESS)
    for key, value in DEFAULT.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"default {value}")
    args = p.parse_args(argv)
    if args.variant:
        with tempfile.TemporaryDirectory() as run_dir:
            result = run_variant(args.variant, json.loads(args.settings), args.ds_config, run_dir, args.seed)
        with open(args.out, "w") as f:
            json.dump(result, f)
        return 0
    settings = dict(QUICK if args.quick else DEFAULT)
    settings.update({k: getattr(args, k) for k in DEFAULT if getattr(args, k) is not None})
    t0 = time.perf_counter()
    results = run_side_by_side(settings, args.ds_config, args.seed)
    conv, mega = results["conventional"], results["megatie"]
    results["ratio_conventional_over_megatie"] = {
        k: conv[k] / mega[k] for k in ("peak_bytes", "avg_bytes", "peak_tensor_bytes", "avg_tensor_bytes")}
    results["settings"] = settings
    results["ds_config"] = os.path.relpath(args.ds_config, ROOT)
    results["benchmark_wall_s"] = time.perf_counter() - t0
    text = json.dumps(results, indent=2)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    mb = 2 ** 20
    print(f"{'':14}{'peak MB':>10}{'avg MB':>10}{'peak tensor MB':>16}{'avg tensor MB':>15}{'tok/s':>9}")
    for name in ("conventional", "megatie"):
        r = results[name]
        print(f"{name:14}{r['peak_bytes'] / mb:10.1f}{r['avg_bytes'] / mb:10.1f}{r['peak_tensor_bytes'] / mb:16.1f}"
              f"{r['avg_tensor_bytes'] / mb:15.1f}{r['tokens_per_second']:9.0f}")
    ratio = results["ratio_conventional_over_megatie"]
    print("ratio conventional/megatie: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
