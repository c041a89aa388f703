"""What a regroup costs: time against a training step, measured memory against the optimizer state,
end-to-end throughput against conventional training - on 1, 2 and 4 ranks, at two shapes.

For every (shape, ranks): megatie (the paper's agent, ZeRO-2, a decision every k=15 steps) and
conventional training side by side, each in fresh processes. Reported from megatie's own run records:

- ``regroup_over_step``: mean regroup time / mean training-step time (summary.json);
- ``max_transient_over_rank_state``: the largest ``regroup_transient_bytes`` - measured: the most any
  rank's live bytes rose during a regroup, DeepSpeed's buffers included (``megatie.metrics.live_bytes``;
  tensor storages on CPU, the allocator on CUDA) - over one rank's share of ``optimizer_state_bytes``
  (fp32 masters and moments of all ranks after the regroup, divided by the ranks);
- tokens per second, megatie / conventional.

    python benchmarks/regroup_overhead.py --out benchmarks/results/regroup_overhead.json
    python benchmarks/regroup_overhead.py --quick      # the default shape only
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import ROOT, side_by_side, write_json  # noqa: E402

SHAPES = {
    "default": dict(n_layer=12, n_embd=192, n_head=4, seq_len=64, batch_size=4, vocab_size=512, max_steps=45,
                    tie_every=15),
    "large": dict(n_layer=24, n_embd=384, n_head=6, seq_len=64, batch_size=4, vocab_size=512, max_steps=45,
                  tie_every=15),
}


def measure(shape: str, settings: dict, ranks: int, ds_config: str, seed: int) -> dict:
    res = side_by_side(dict(settings, probe=False), ds_config, seed, world=ranks)
    conv, mega = res["conventional"], res["megatie"]
    return {"shape": shape, "ranks": ranks, "settings": settings, "regroups": mega["regroups"],
            "regroup_s_mean": mega["regroup_seconds_mean"], "step_s_mean": mega["step_seconds_mean"],
            "regroup_over_step": mega["regroup_over_step"],
            "max_transient_over_rank_state": mega["max_transient_over_rank_state"],
            "transient_source": mega["regroup_transient_source"],
            "optimizer_state_bytes": mega["optimizer_state_bytes"],
            "tokens_per_second": {"conventional": conv["tokens_per_second"], "megatie": mega["tokens_per_second"]},
            "megatie_vs_conventional_throughput": mega["tokens_per_second"] / conv["tokens_per_second"],
            "rank_checksums_agree": len(set(mega["rank_param_checksums"])) == 1,
            "mean_independent_layers": mega["mean_independent_layers"], "device": mega["device"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the default shape only")
    p.add_argument("--ranks", default="1,2,4", help="comma-separated world sizes (more ranks than cores is slow but real)")
    p.add_argument("--ds-config", default=os.path.join(ROOT, "ds_configs", "zero2.json"))
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out")
    args = p.parse_args(argv)
    shapes = ["default"] if args.quick else list(SHAPES)
    t0 = time.perf_counter()
    rows = []
    for shape in shapes:
        for ranks in (int(r) for r in args.ranks.split(",")):
            rows.append(measure(shape, SHAPES[shape], ranks, args.ds_config, args.seed))
    out = {"rows": rows, "ds_config": os.path.relpath(os.path.abspath(args.ds_config), ROOT),
           "benchmark_wall_s": time.perf_counter() - t0}
    write_json(args.out, out)
    print(f"{'shape':8}{'ranks':>6}{'regroups':>9}{'regroup ms':>11}{'step ms':>9}{'regroup/step':>13}"
          f"{'transient/rank state':>21}{'tok/s megatie/conv':>20}{'checksums':>10}")
    for r in rows:
        print(f"{r['shape']:8}{r['ranks']:6d}{r['regroups']:9d}{r['regroup_s_mean'] * 1e3:11.1f}"
              f"{r['step_s_mean'] * 1e3:9.1f}{r['regroup_over_step']:13.3f}{r['max_transient_over_rank_state']:21.3f}"
              f"{r['megatie_vs_conventional_throughput']:20.2f}{'equal' if r['rank_checksums_agree'] else 'DIFFER':>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
