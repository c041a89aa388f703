"""``reproduce.py --corpora``: the same rows and seeds on several corpora, one table, one Pareto figure,
and the default policy chosen by its *worst* corpus.

Per corpus and row: validation perplexity (mean ± std over seeds), its ratio to conventional (paired by
seed: the same data order and validation text), and the mean trainable parameters as a share of
conventional's. Across the corpora used for choosing: the mean and the worst ratio. Corpora named in
``--kept-aside`` are trained and reported like the others but never enter the choice. The rule: among
the rows whose mean trainable parameters are at most ``--budget`` of conventional's on every choosing
corpus, the default is the row with the smallest worst-case perplexity ratio.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import sys

from corpora import prepare
from jobs import run_dir, run_jobs


def corpus_opts(opts, corpus, full_corpus_tokenizer):
    """``opts`` for one corpus: its files, its own output directory (and so its own tokenizer, trained by
    ``full_corpus_tokenizer(opts)``)."""
    c = copy.copy(opts)
    c.train_file, c.valid_file = [corpus.train], [corpus.valid]
    c.out_dir = os.path.join(opts.out_dir, corpus.name)
    c.tokenizer_args = [] if opts.report_only or opts.dry_run else full_corpus_tokenizer(c)
    return c


def _runs(opts, corpus_dir: str, row: str) -> dict[int, dict]:
    out = {}
    for seed in opts.seeds:
        path = os.path.join(run_dir(corpus_dir, opts.regime, seed, row), "summary.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                out[seed] = json.load(f)
    return out


def corpus_table(opts, rows: list[str], corpus_dir: str) -> dict[str, dict]:
    """Row -> ppl (per seed), PPL ratio to conventional (paired by seed), parameter ratio."""
    conv = _runs(opts, corpus_dir, "conventional")
    table = {}
    for row in rows:
        runs = _runs(opts, corpus_dir, row)
        if not runs:
            continue
        paired = [runs[s]["best_val_ppl"] / conv[s]["best_val_ppl"] for s in runs if s in conv]
        # Against the conventional row's model where it ran: a row may change the shape (fewer blocks, a
        # narrower width), and then its own untied count is not the model it is compared with.
        params = [r["mean_trainable_params"] / (conv[s] if s in conv else r)["conventional_trainable_params"]
                  for s, r in runs.items()]
        table[row] = {"seeds": sorted(runs), "ppl": [runs[s]["best_val_ppl"] for s in sorted(runs)],
                      "ppl_ratio": statistics.fmean(paired) if paired else None,
                      "param_ratio": statistics.fmean(params),
                      "final_state": runs[min(runs)]["final_state"]}
    return table


def choose_default(tables: dict[str, dict], choosing: list[str], budget: float,
                   untied: frozenset[str] = frozenset({"conventional"})) -> tuple[str | None, dict]:
    """The row with the smallest worst-case PPL ratio over ``choosing``, among the tying rows (not those in
    ``untied``: conventional and the plain smaller models it is compared with) within ``budget``."""
    worst = {}
    for row in {r for name in choosing for r in tables.get(name, {})}:
        cells = [tables.get(name, {}).get(row) for name in choosing]
        if any(c is None or c["ppl_ratio"] is None for c in cells) or row in untied:
            continue
        if all(c["param_ratio"] <= budget + 1e-9 for c in cells):
            worst[row] = max(c["ppl_ratio"] for c in cells)
    return (min(worst, key=worst.get) if worst else None), worst


def _fmt(values, digits=2) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown(tables, rows, corpora, kept_aside, budget, default, worst) -> str:
    choosing = [c for c in corpora if c not in kept_aside]
    head = "| row | " + " | ".join(f"{c}{' (kept aside)' if c in kept_aside else ''}" for c in corpora)
    head += " | mean ratio (choosing) | worst ratio (choosing) | seeds |"
    lines = ["PPL (mean ± std over seeds), then PPL / conventional's (paired by seed) and mean trainable "
             "parameters / conventional's, per corpus.", "", head, "|" + "---|" * (len(corpora) + 4)]
    for row in rows:
        cells, ratios, seeds = [], [], []
        for c in corpora:
            cell = tables.get(c, {}).get(row)
            if cell is None:
                cells.append("-")
                continue
            seeds.append(len(cell["seeds"]))
            ratio = "-" if cell["ppl_ratio"] is None else f"{cell['ppl_ratio']:.3f}x"
            cells.append(f"{_fmt(cell['ppl'])} ({ratio}, {cell['param_ratio']:.2f}x params)")
            if c in choosing and cell["ppl_ratio"] is not None:
                ratios.append(cell["ppl_ratio"])
        mean = f"{statistics.fmean(ratios):.3f}x" if len(ratios) == len(choosing) else "-"
        worst_cell = f"{max(ratios):.3f}x" if len(ratios) == len(choosing) else "-"
        name = f"**{row}**" if row == default else row
        counts = "-" if not seeds else str(min(seeds)) if min(seeds) == max(seeds) else f"{min(seeds)}-{max(seeds)}"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean} | {worst_cell} | {counts} |")
    verdict = (f"Default by the worst choosing corpus among the tying rows within {budget:.2f}x of conventional's trainable "
               f"parameters: **{default}** (worst ratios: "
               + ", ".join(f"{r} {v:.3f}x" for r, v in sorted(worst.items(), key=lambda kv: kv[1])) + ")."
               if default else "No row within the budget ran on every choosing corpus.")
    return "\n".join(lines) + "\n\n" + verdict + "\n"


def pareto_figure(tables, corpora, kept_aside, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    rows = sorted({r for t in tables.values() for r in t})
    # tab20's dark shades, then its light ones, without its greys (14, 15): grey draws the corpus legend.
    palette = [plt.cm.tab20(j) for j in [*range(0, 20, 2), *range(1, 20, 2)] if j not in (14, 15)]
    colours = {r: palette[i % len(palette)] for i, r in enumerate(rows)}
    markers = "osD^vP*Xh"
    for k, c in enumerate(corpora):
        for row, cell in tables.get(c, {}).items():
            if cell["ppl_ratio"] is None:
                continue
            hollow = c in kept_aside
            ax.scatter(cell["param_ratio"], cell["ppl_ratio"], marker=markers[k % len(markers)], s=60,
                       facecolors="none" if hollow else colours[row], edgecolors=colours[row])
    for row in rows:
        ax.scatter([], [], color=colours[row], label=row)
    for k, c in enumerate(corpora):
        ax.scatter([], [], marker=markers[k % len(markers)], color="grey",
                   facecolors="none" if c in kept_aside else "grey", label=c + (" (kept aside)" if c in kept_aside else ""))
    ax.axhline(1.05, color="grey", ls=":", lw=1)
    ax.axvline(1 / 3, color="grey", ls=":", lw=1)
    ax.set_xlabel("mean trainable parameters / conventional's")
    ax.set_ylabel("validation PPL / conventional's (same seed)")
    ax.set_title("Tying policies across corpora (one point per policy and corpus)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(opts, rows: list[str], command, full_corpus_tokenizer) -> int:
    """``command(opts, row, seed)`` and ``full_corpus_tokenizer(opts)``: reproduce.py's, for one corpus."""
    corpora = [prepare(spec, opts.out_dir) for spec in opts.corpora]
    names = [c.name for c in corpora]
    unknown = [k for k in opts.kept_aside if k not in names]
    if unknown:
        print(f"error: --kept-aside names {unknown}, not among --corpora {names}", file=sys.stderr)
        return 2
    jobs = []
    c_opts = {corpus.name: corpus_opts(opts, corpus, full_corpus_tokenizer) for corpus in corpora}
    for seed in opts.seeds:  # seed by seed: an interrupted command leaves whole seeds, every corpus
        for corpus in corpora:
            for row in rows:
                cmd = command(c_opts[corpus.name], row, seed)
                if opts.dry_run:
                    print(" ".join(cmd))
                jobs.append((f"{corpus.name} {row} seed {seed}", cmd,
                             run_dir(c_opts[corpus.name].out_dir, opts.regime, seed, row)))
    if opts.dry_run:
        return 0
    if not opts.report_only:
        run_jobs(jobs, opts.jobs)
    tables = {c.name: corpus_table(opts, rows, os.path.join(opts.out_dir, c.name)) for c in corpora}
    choosing = [n for n in names if n not in opts.kept_aside]
    default, worst = choose_default(tables, choosing, opts.budget, frozenset(opts.untied_rows))
    md = markdown(tables, rows, names, opts.kept_aside, opts.budget, default, worst)
    base = os.path.join(opts.out_dir, f"corpora_{opts.regime}")
    with open(base + ".md", "w", encoding="utf-8") as f:
        f.write(md)
    with open(base + ".json", "w", encoding="utf-8") as f:
        json.dump({"regime": opts.regime, "seeds": opts.seeds, "preset": opts.preset, "budget": opts.budget,
                   "corpora": {c.name: {"source": c.source, "kept_aside": c.name in opts.kept_aside} for c in corpora},
                   "default": default, "worst_ratio": worst, "tables": tables}, f, indent=1)
    figure = pareto_figure(tables, names, opts.kept_aside, os.path.join(opts.out_dir, f"pareto_{opts.regime}.png"))
    print(md)
    print(f"wrote {base}.md, {base}.json and {figure}")
    return 0
