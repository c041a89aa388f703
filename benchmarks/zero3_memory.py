"""What one rank holds under ZeRO-2 and ZeRO-3 with ties, on 1 and 2 ranks, and what a regroup costs there.

For each (stage, ranks) megatie trains the same model (the paper's agent, decisions every k steps) in
fresh processes (``harness.spawn``); reported from rank-0's figures, the largest of any rank:

- ``rank_weight_bytes``: the weights a rank holds at the end - whole under ZeRO-2, its partitions under
  ZeRO-3 (tensors below ``stage3_param_persistence_threshold`` stay whole: biases and norms here);
- ``rank_optimizer_bytes``: its fp32 masters and Adam moments;
- ``regroup_transient_bytes``: the most a rank's live bytes rose during a regroup (measured,
  ``megatie.metrics.live_bytes``), over the rank's whole state at the end (weights + masters + moments);
- ``regroup_excess_bytes``: the part of that rise above the level the regroup ends at (the rest is state
  that stays: blocks starting to train, or untied, bring their masters and moments);
- ``regroup_over_step``: mean regroup time over mean training-step time.

    python benchmarks/zero3_memory.py --out benchmarks/results/zero3_memory.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import ROOT, spawn, write_json  # noqa: E402

SHAPE = dict(n_layer=24, n_embd=384, n_head=6, seq_len=64, batch_size=4, vocab_size=512, max_steps=45,
             tie_every=15)
CONFIGS = {2: os.path.join(ROOT, "ds_configs", "zero2.json"), 3: os.path.join(ROOT, "ds_configs", "zero3.json")}
GOALS = {"two_ranks_over_one": 0.55, "transient_over_rank_state": 0.6, "regroup_over_step": 1.0}


def measure(stage: int, ranks: int, settings: dict, seed: int) -> dict:
    r = spawn("megatie", settings, CONFIGS[stage], seed, world=ranks)
    state = r["rank_weight_bytes"] + r["rank_optimizer_bytes"]
    transient, excess = r["max_regroup_transient_bytes"] or 0, r["max_regroup_excess_bytes"] or 0
    return {"stage": stage, "ranks": ranks, "rank_weight_bytes": r["rank_weight_bytes"],
            "rank_optimizer_bytes": r["rank_optimizer_bytes"], "rank_state_bytes": state,
            "regroup_transient_bytes": transient, "transient_over_rank_state": transient / state,
            "regroup_excess_bytes": excess, "excess_over_rank_state": excess / state,
            "regroup_over_step": r["regroup_over_step"], "regroups": r["regroups"],
            "tokens_per_second": r["tokens_per_second"], "rank_param_checksums": r["rank_param_checksums"]}


def print_table(rows: list[dict]) -> None:
    mb = 2 ** 20
    print(f"{'stage':>5} {'ranks':>5} {'weights MB':>11} {'optim MB':>9} {'state MB':>9} {'vs 1 rank':>9} "
          f"{'regroup MB':>10} {'/state':>7} {'excess MB':>9} {'/state':>7} {'regroup/step':>12} {'tok/s':>7}")
    for r in rows:
        print(f"{r['stage']:>5} {r['ranks']:>5} {r['rank_weight_bytes'] / mb:11.2f} {r['rank_optimizer_bytes'] / mb:9.2f} "
              f"{r['rank_state_bytes'] / mb:9.2f} {r.get('over_one_rank', 1.0):9.3f} "
              f"{r['regroup_transient_bytes'] / mb:10.2f} {r['transient_over_rank_state']:7.3f} "
              f"{r['regroup_excess_bytes'] / mb:9.2f} {r['excess_over_rank_state']:7.3f} "
              f"{r['regroup_over_step'] or 0:12.2f} {r['tokens_per_second']:7.0f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--stages", default="2,3")
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--out", default=None, help="JSON result file")
    for key, value in SHAPE.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=value)
    args = p.parse_args(argv)
    settings = {k: getattr(args, k) for k in SHAPE}
    t0, rows = time.perf_counter(), []
    for stage in (int(s) for s in args.stages.split(",")):
        for ranks in (int(r) for r in args.ranks.split(",")):
            rows.append(measure(stage, ranks, settings, args.seed))
            one = next(r for r in rows if r["stage"] == stage)
            rows[-1]["over_one_rank"] = rows[-1]["rank_state_bytes"] / one["rank_state_bytes"]
    zero3_two = next((r for r in rows if r["stage"] == 3 and r["ranks"] == 2), None)
    goals = None if zero3_two is None else {
        "two_ranks_over_one": zero3_two["over_one_rank"],
        "transient_over_rank_state": max(r["transient_over_rank_state"] for r in rows if r["stage"] == 3),
        "excess_over_rank_state": max(r["excess_over_rank_state"] for r in rows if r["stage"] == 3),
        "regroup_over_step": max(r["regroup_over_step"] or 0 for r in rows if r["stage"] == 3)}
    write_json(args.out, {"rows": rows, "settings": settings, "goals": GOALS, "measured": goals,
                          "benchmark_wall_s": time.perf_counter() - t0})
    print_table(rows)
    if goals:
        print("ZeRO-3 against the goals: " + ", ".join(f"{k} {v:.3f} (goal <= {GOALS.get(k, '-')})" for k, v in goals.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
