"""Cost of a regroup and end-to-end throughput, megatie vs conventional, ZeRO-2, k = 15.

Reports the mean time of one regroup (state gather, teardown, ``deepspeed.initialize``, restore)
against the mean time of one training step, and tokens per second of the whole run for both
variants (the paper: megatie 11% slower per epoch than conventional). Each variant runs in its own
process, with the same model, batch and data.

    python benchmarks/regroup_overhead.py --quick --out benchmarks/results/regroup_overhead_quick.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from memory import DEFAULT, ROOT, run_side_by_side  # noqa: E402

QUICK = dict(DEFAULT, n_embd=192, n_head=4, n_layer=12, max_steps=45, tie_every=15)
FULL = dict(DEFAULT, max_steps=150, tie_every=15)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--ds-config", default=os.path.join(ROOT, "ds_configs", "zero2.json"))
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out")
    for key in DEFAULT:
        p.add_argument(f"--{key.replace('_', '-')}", type=int)
    args = p.parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    settings.update({k: getattr(args, k) for k in DEFAULT if getattr(args, k) is not None})
    settings["probe"] = False  # no memory probes in a timing run
    t0 = time.perf_counter()
    res = run_side_by_side(settings, args.ds_config, args.seed)
    conv, mega = res["conventional"], res["megatie"]
    regroup = mega["regroup_seconds"] / max(mega["regroups"], 1)
    step = (mega["train_time_s"] - mega["regroup_seconds"]) / mega["steps"]
    out = {
        "settings": settings, "ds_config": os.path.relpath(args.ds_config, ROOT),
        "regroups": mega["regroups"], "regroup_s_mean": regroup, "megatie_step_s_mean": step,
        "conventional_step_s_mean": conv["train_time_s"] / conv["steps"],
        "regroup_over_step": regroup / step,
        "tokens_per_second": {"conventional": conv["tokens_per_second"], "megatie": mega["tokens_per_second"]},
        "megatie_vs_conventional_throughput": mega["tokens_per_second"] / conv["tokens_per_second"],
        "mean_independent_layers": mega["mean_independent_layers"],
        "device": mega["device"], "benchmark_wall_s": time.perf_counter() - t0,
    }
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
    print(f"one regroup {regroup * 1e3:.0f} ms vs one megatie step {step * 1e3:.0f} ms "
          f"({out['regroup_over_step']:.2f} steps); conventional step {out['conventional_step_s_mean'] * 1e3:.0f} ms")
    print(f"tokens/s: conventional {conv['tokens_per_second']:.0f}, megatie {mega['tokens_per_second']:.0f} "
          f"(megatie/conventional = {out['megatie_vs_conventional_throughput']:.2f}) over {mega['steps']} steps, "
          f"{mega['regroups']} regroups, k={settings['tie_every']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
