"""Does depth pay? A conventional L-block model against every untied model with at most a third of its
trainable parameters (fewer blocks and/or narrower), each at its best learning rate, over seeds.

Tying can only beat training a smaller model where depth pays: where the deep model beats the best
small one by a clear margin. This grid looks for that regime; every run is a plain untied model trained
by the GPT-2 launcher (``--tie-policy conventional``), so the table says what depth is worth before any
tying. Runs are resumable (a finished run is never trained again), so a grid is built over several
invocations; ``--jobs`` runs that many at once (one thread each).

    python benchmarks/depth_grid.py --train-file T.txt --valid-file V.txt --base 6x64 \
        --candidates 1x72,2x56 --lrs 4e-3,8e-3 --seeds 0,1,2 --steps 1800 --out-dir runs/depth
    python benchmarks/depth_grid.py ... --report-only     # the table from the runs so far

A shape is ``LxD`` (L blocks of width D, ``--n-head`` heads) or ``LxD/H``. The verdict: depth pays when
the base, at its best learning rate, beats the best candidate within ``--budget`` (at its own best) by at
least ``--margin`` in mean validation perplexity. A candidate ``LxD[/H]@POLICY`` is a *tied* model (the
launcher's ``--tie-policy POLICY``, e.g. ``12x768/12@split``): where depth pays, the grid then also says
whether the best tied model within the budget beats the best untied one - whether tying pays.
``benchmarks/gpu_suite.py`` runs it at GPT-2 124M's width on a GPU (optional step ``depth-pays``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from jobs import ROOT, run_jobs  # noqa: E402


def split_policy(shape: str) -> tuple[str, str]:
    """``"6x64@split"`` -> ``("6x64", "split")``; an untied shape has the policy ``conventional``."""
    body, _, policy = shape.partition("@")
    return body, policy or "conventional"


def parse_shape(text: str, heads: int) -> tuple[int, int, int]:
    text = split_policy(text)[0]
    try:
        body, _, h = text.partition("/")
        layers, width = (int(x) for x in body.lower().split("x"))
        h = int(h) if h else heads
    except ValueError:
        raise SystemExit(f"error: shape {text!r} is not LxD or LxD/H") from None
    if layers < 1 or width < 1 or h < 1 or width % h:
        raise SystemExit(f"error: shape {text!r}: positive sizes, and heads dividing the width")
    return layers, width, h


def run_name(shape: str, lr: float, seed: int) -> str:
    return f"{shape.replace('/', 'h').replace('@', '_')}_lr{lr:g}_s{seed}"


def command(opts, shape: str, lr: float, seed: int) -> list[str]:
    layers, width, heads = parse_shape(shape, opts.n_head)
    return [sys.executable, os.path.join(ROOT, "launchers", "train_gpt2.py"),
            "--out-dir", os.path.join(opts.out_dir, run_name(shape, lr, seed)), "--tie-policy", split_policy(shape)[1],
            "--n-layer", str(layers), "--n-embd", str(width), "--n-head", str(heads), "--seq-len", str(opts.seq_len),
            "--batch-size", str(opts.batch_size), "--vocab-size", str(opts.vocab_size), "--lr", str(lr),
            "--max-steps", str(opts.steps), "--eval-every", str(max(1, opts.steps // 4)),
            "--eval-batches", str(opts.eval_batches), "--seed", str(seed), "--train-file", opts.train_file,
            "--valid-file", opts.valid_file, "--cache-dir", opts.cache_dir, "--no-checkpoints", "--no-progress",
            *opts.extra]


def collect(opts, shapes: list[str]) -> dict[str, dict]:
    """Per shape: its parameters, and per learning rate the validation perplexity of every finished seed."""
    table: dict[str, dict] = {}
    for shape in shapes:
        row = {"params": None, "by_lr": {}, "minutes": []}
        for lr in opts.lrs:
            for seed in opts.seeds:
                path = os.path.join(opts.out_dir, run_name(shape, lr, seed), "summary.json")
                if not os.path.isfile(path):
                    continue
                with open(path, encoding="utf-8") as f:
                    s = json.load(f)
                row["params"] = s["mean_trainable_params"]
                row["by_lr"].setdefault(f"{lr:g}", {})[seed] = s["best_val_ppl"]
                row["minutes"].append(s.get("train_time_s", 0) / 60)
        table[shape] = row
    return table


def best_lr(row: dict, seeds: list[int]) -> tuple[str | None, float | None]:
    """The learning rate with the lowest mean perplexity over the seeds every lr has finished."""
    means = {lr: statistics.mean(runs[s] for s in seeds) for lr, runs in row["by_lr"].items()
             if all(s in runs for s in seeds)}
    if not means:
        return None, None
    lr = min(means, key=means.get)
    return lr, means[lr]


def verdict(opts, table: dict) -> dict:
    base = table[opts.base]
    base_lr, base_ppl = best_lr(base, opts.seeds)
    within = [s for s in opts.candidates if table[s]["params"] and base["params"]
              and table[s]["params"] <= opts.budget * base["params"]]
    scored = [(s, *best_lr(table[s], opts.seeds)) for s in within]
    untied = [x for x in scored if x[2] is not None and split_policy(x[0])[1] == "conventional"]
    tied = [x for x in scored if x[2] is not None and split_policy(x[0])[1] != "conventional"]
    if base_ppl is None or not untied:
        return {"complete": False}
    shape, lr, ppl = min(untied, key=lambda x: x[2])
    result = {"complete": True, "base": opts.base, "base_lr": base_lr, "base_ppl": base_ppl, "best_small": shape,
              "best_small_lr": lr, "best_small_ppl": ppl,
              "best_small_params_ratio": table[shape]["params"] / base["params"],
              "small_over_base": ppl / base_ppl, "depth_pays": ppl / base_ppl >= 1 + opts.margin}
    if tied:
        t_shape, t_lr, t_ppl = min(tied, key=lambda x: x[2])
        result.update(best_tied=t_shape, best_tied_lr=t_lr, best_tied_ppl=t_ppl, tied_over_base=t_ppl / base_ppl,
                      best_tied_params_ratio=table[t_shape]["params"] / base["params"], tying_pays=t_ppl < ppl)
    return result


def markdown(opts, table: dict, result: dict) -> str:
    base_params = table[opts.base]["params"]
    lines = ["| shape | params | ratio | " + " | ".join(f"lr {lr:g}" for lr in opts.lrs) + " | min/run |",
             "|---|---|---|" + "---|" * len(opts.lrs) + "---|"]
    for shape, row in table.items():
        cells = []
        for lr in opts.lrs:
            runs = row["by_lr"].get(f"{lr:g}", {})
            cells.append(" / ".join(f"{runs[s]:.2f}" for s in opts.seeds if s in runs) or "-")
        ratio = f"{row['params'] / base_params:.2f}" if row["params"] and base_params else "-"
        minutes = f"{statistics.mean(row['minutes']):.1f}" if row["minutes"] else "-"
        lines.append(f"| {shape}{' (base)' if shape == opts.base else ''} | {row['params'] or '-'} | {ratio} | "
                     + " | ".join(cells) + f" | {minutes} |")
    if result.get("complete"):
        lines.append(f"\nBase {result['base']} at lr {result['base_lr']}: {result['base_ppl']:.2f}; best model within "
                     f"{opts.budget:.2f}x of its parameters: {result['best_small']} at lr {result['best_small_lr']}: "
                     f"{result['best_small_ppl']:.2f} ({result['small_over_base']:.3f}x the base's perplexity). "
                     f"Depth pays (>= {1 + opts.margin:.2f}x): **{'yes' if result['depth_pays'] else 'no'}**.")
        if "best_tied" in result:
            lines.append(f"Best tied model within the budget: {result['best_tied']} at lr {result['best_tied_lr']}: "
                         f"{result['best_tied_ppl']:.2f} ({result['tied_over_base']:.3f}x). Tying beats the best "
                         f"untied model: **{'yes' if result['tying_pays'] else 'no'}**.")
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-file", required=True)
    p.add_argument("--valid-file", required=True)
    p.add_argument("--base", required=True, help="the conventional deep model, LxD[/H]")
    p.add_argument("--candidates", required=True,
                   help="comma-separated shapes to compare with it: untied LxD[/H], or tied LxD[/H]@POLICY")
    p.add_argument("--lrs", default="4e-3,8e-3", help="learning rates tried for every shape")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=1800)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=512, help="small, so that the blocks hold the parameters")
    p.add_argument("--n-head", type=int, default=2, help="heads where a shape does not say (LxD/H)")
    p.add_argument("--eval-batches", type=int, default=48)
    p.add_argument("--budget", type=float, default=1 / 3, help="candidates' parameters as a fraction of the base's")
    p.add_argument("--margin", type=float, default=0.05, help="how much worse the best small model must be")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--out-dir", default="runs/depth_grid")
    p.add_argument("--cache-dir", default="~/.cache/megatie")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--dry-run", action="store_true")
    opts, extra = p.parse_known_args(argv)
    opts.extra = extra  # passed to every run (e.g. --deepspeed ds_configs/zero2_bf16.json on a GPU)
    opts.candidates = [c for c in opts.candidates.split(",") if c]
    opts.lrs = [float(x) for x in opts.lrs.split(",")]
    opts.seeds = [int(x) for x in opts.seeds.split(",")]
    for shape in [opts.base, *opts.candidates]:
        parse_shape(shape, opts.n_head)
    return opts


def main(argv=None) -> int:
    opts = parse(argv)
    shapes = [opts.base, *opts.candidates]
    jobs = [(run_name(s, lr, seed), command(opts, s, lr, seed), os.path.join(opts.out_dir, run_name(s, lr, seed)))
            for seed in opts.seeds for lr in opts.lrs for s in shapes]
    if opts.dry_run:
        print("\n".join(" ".join(cmd) for _, cmd, _ in jobs))
        return 0
    if not opts.report_only:
        run_jobs(jobs, opts.jobs)
    table = collect(opts, shapes)
    result = verdict(opts, table)
    md = markdown(opts, table, result)
    os.makedirs(opts.out_dir, exist_ok=True)
    with open(os.path.join(opts.out_dir, "depth_grid.json"), "w", encoding="utf-8") as f:
        json.dump({"settings": {k: v for k, v in vars(opts).items() if k not in ("report_only", "dry_run")},
                   "table": table, "verdict": result}, f, indent=1)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
