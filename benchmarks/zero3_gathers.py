"""What ZeRO-3 gathers per training step, conventional against tied blocks: does a root shared by k
positions cost k gathers, or one?

One rank (gloo on the CPU; what is gathered is decided per tensor, whatever the number of ranks), the
same model conventional and tied by a static map (every root shared by ``--share`` consecutive blocks),
under two of DeepSpeed's live-parameter budgets: its defaults (``stage3_max_live_parameters`` and
``stage3_max_reuse_distance`` 1e9 elements: a gathered tensor stays whole while it will be used again
within that distance and the budget lasts) and 1 (each tensor released right after the module that
used it). Counted in DeepSpeed's parameter coordinator: the tensors
it gathers and their elements, per step, averaged over the steps after the first (which records the
module trace). Each configuration runs in a fresh process.

    python benchmarks/zero3_gathers.py --out benchmarks/results/zero3_gathers.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import ROOT, _port, scratch_dir, write_json  # noqa: E402

SHAPE = ["--n-layer", "12", "--n-embd", "192", "--n-head", "4", "--seq-len", "64", "--batch-size", "4",
         "--vocab-size", "512", "--max-steps", "6"]
# DeepSpeed's defaults, and a budget that releases each tensor as soon as its module is done with it.
BUDGETS = {"default": {}, "release after use": {"stage3_max_live_parameters": 1, "stage3_max_reuse_distance": 1}}


def count_in_process(argv: list[str], ds_config: dict) -> dict:
    """Train ``argv`` under ``ds_config`` in this process and count what the coordinator gathers per step."""
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
        os.environ.setdefault(key, value)
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as C

    from megatie.runtime.distributed import init_deepspeed_distributed, shutdown_distributed
    from megatie.tools.train_cli import build_parser, config_from_args
    from megatie.trainer import Trainer

    count = {"tensors": 0, "elements": 0}
    gather = C._PartitionedParameterCoordinator__all_gather_params  # private: DeepSpeed pinned in setup.py

    def counted(self, params, forward):
        count["tensors"] += len(params)
        count["elements"] += sum(p.ds_numel for p in params)
        return gather(self, params, forward)

    C._PartitionedParameterCoordinator__all_gather_params = counted
    sync = init_deepspeed_distributed()
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(ds_config, f)
    try:
        trainer = Trainer(config_from_args(build_parser().parse_args(argv + ["--deepspeed", f.name])), sync=sync)
        per_step, step = [], trainer.engine.train_step

        def train_step(batches):
            count.update(tensors=0, elements=0)
            loss = step(batches)
            per_step.append(dict(count))
            return loss

        trainer.engine.train_step = train_step
        summary = trainer.train()
    finally:
        os.unlink(f.name)
        shutdown_distributed()
    later = per_step[1:]
    return {"tensors_per_step": sum(c["tensors"] for c in later) / len(later),
            "elements_per_step": sum(c["elements"] for c in later) / len(later),
            "trainable_params": summary["final_trainable_params"]}


def measure(variant: str, tie_flags: list[str], budget: str, seed: int) -> dict:
    config = {"zero_optimization": {"stage": 3, "overlap_comm": False, "stage3_param_persistence_threshold": 0,
                                    **BUDGETS[budget]}}
    with scratch_dir() as out:
        argv = SHAPE + tie_flags + ["--out-dir", out, "--seed", str(seed), "--no-checkpoints", "--no-progress",
                                    "--eval-every", "1000000", "--eval-batches", "1"]
        r = subprocess.run([sys.executable, __file__, "--in-process", json.dumps([argv, config])], cwd=ROOT,
                           capture_output=True, text=True, env=dict(os.environ, MASTER_PORT=str(_port())))
    if r.returncode:
        raise RuntimeError(f"{variant} failed:\n{r.stderr[-3000:]}")
    return {"variant": variant, "budget": budget, **json.loads(r.stdout.strip().splitlines()[-1])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--share", type=int, default=3, help="blocks per root in the tied model (default 3)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", default=None)
    p.add_argument("--in-process", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.in_process:
        print(json.dumps(count_in_process(*json.loads(args.in_process))))
        return 0
    n_layer = int(SHAPE[SHAPE.index("--n-layer") + 1])
    tied_map = ",".join(str(i - i % args.share) for i in range(n_layer))
    variants = {"conventional": ["--tie-policy", "conventional"],
                f"tied (roots of {args.share})": ["--tie-policy", "static", "--static-state", tied_map]}
    rows = [measure(name, flags, budget, args.seed) for budget in BUDGETS for name, flags in variants.items()]
    for budget in BUDGETS:
        conv = next(r for r in rows if r["budget"] == budget and r["variant"] == "conventional")
        for r in rows:
            if r["budget"] == budget:
                r["elements_over_conventional"] = r["elements_per_step"] / conv["elements_per_step"]
    write_json(args.out, {"rows": rows, "shape": SHAPE, "share": args.share})
    print(f"{'live budget':>18} {'variant':>20} {'trainable':>10} {'tensors/step':>13} {'elements/step':>14} {'vs conv':>8}")
    for r in rows:
        print(f"{r['budget']:>18} {r['variant']:>20} {r['trainable_params']:10d} {r['tensors_per_step']:13.1f} "
              f"{r['elements_per_step']:14.0f} {r['elements_over_conventional']:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
