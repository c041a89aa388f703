"""The paper's figures from a finished run directory (metrics.jsonl, summary.json, a checkpoint).

- Fig. 1 ``replication_map``: which block each block shares its weights with at the end;
- Fig. 2 ``tie_events``: blocks tied, re-tied and untied at every decision;
- Fig. 3 ``trainable_steps``: for how many optimizer steps each block had weights of its own;
- Fig. 4 ``mlp_correlation``: Pearson correlation between the independent blocks' MLP weights.

Everything is read from files, so figures can be drawn for any run, old or new, without a model.
"""

from __future__ import annotations

import json
import math
import os

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from megatie.errors import ConfigError  # noqa: E402
from megatie.tying.tie_map import num_independent  # noqa: E402


def load_run(run_dir: str) -> dict:
    """``{"config", "summary", "decisions", "evals"}`` of a finished run."""
    out = {}
    for key in ("config", "summary"):
        path = os.path.join(run_dir, f"{key}.json")
        if not os.path.isfile(path):
            raise ConfigError(f"{run_dir!r} has no {key}.json; is it a finished run?")
        with open(path, encoding="utf-8") as f:
            out[key] = json.load(f)
    rows = []
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    out["decisions"] = [r for r in rows if r.get("event") == "decision"]
    out["evals"] = [r for r in rows if r.get("event") == "eval"]
    out["label"] = out["config"].get("tie_policy", "?")
    return out


def initial_roots(config: dict, summary: dict) -> list[int]:
    """Blocks with trainable weights of their own before the first decision."""
    from megatie.tying.registry import build_policy

    L = summary["n_layer"]
    try:
        policy = build_policy(config["tie_policy"], L, static_state=summary.get("final_state"),
                              total_steps=summary["steps"], tie_every=config.get("tie_every", 15),
                              grow_start=config.get("grow_start", 0.5), grow_final=config.get("grow_final"),
                              grow_layout=config.get("grow_layout", "contiguous"))
    except ConfigError:
        # Replays need their reference run; every replay starts frozen with block 0 alone trainable.
        return [0]
    if policy.frozen_start:
        return [0]
    state = policy.initial_state()
    return [i for i in range(L) if state[i] == i]


def trainable_steps(run: dict) -> np.ndarray:
    """Steps during which each block was a group root (trained weights of its own)."""
    summary, decisions = run["summary"], run["decisions"]
    L, steps = summary["n_layer"], summary["steps"]
    counts = np.zeros(L)
    roots, last = initial_roots(run["config"], summary), 0
    for d in decisions:
        counts[roots] += d["step"] - last
        last = d["step"]
        roots = [i for i, s in enumerate(d["state"]) if s == i]
    counts[roots] += steps - last
    return counts


def mlp_weights(run_dir: str) -> dict[int, np.ndarray]:
    """Flattened MLP weights of every independent block, from ``best`` or the newest checkpoint."""
    from safetensors import safe_open

    root = os.path.join(run_dir, "checkpoints")
    names = sorted(os.listdir(root)) if os.path.isdir(root) else []
    steps = [n for n in names if n.startswith("step_")]
    chosen = "best" if "best" in names else (steps[-1] if steps else None)
    if chosen is None:
        raise ConfigError(f"{run_dir!r} has no checkpoint to read weights from")
    out: dict[int, list] = {}
    with safe_open(os.path.join(root, chosen, "model.safetensors"), "pt") as f:
        # Each distinct tensor is stored once, under its root block's name.
        for key in f.keys():
            parts = key.split(".")
            if ".mlp." in key and key.endswith("weight") and "h" in parts:
                block = int(parts[parts.index("h") + 1])
                out.setdefault(block, []).append(f.get_tensor(key).float().flatten().numpy())
    return {b: np.concatenate(v) for b, v in sorted(out.items())}


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_replication_map(run: dict, path: str) -> str:
    state = run["summary"]["final_state"]
    L = len(state)
    grid = np.zeros((L, L))
    for i, s in enumerate(state):
        grid[i, s] = 1
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.imshow(grid, cmap="Blues", origin="upper")
    ax.set_xlabel("block whose weights are used (root)")
    ax.set_ylabel("block")
    ax.set_xticks(range(L))
    ax.set_yticks(range(L))
    ax.set_title(f"Fig. 1 replication map at the end\n{run['label']}: "
                 f"{num_independent(state)} independent of {L}", fontsize=9)
    return _save(fig, path)


def plot_tie_events(run: dict, path: str) -> str:
    d = run["decisions"]
    fig, ax = plt.subplots(figsize=(6, 3))
    if d:
        x = [r["decision"] for r in d]
        for key, color in (("tied", "tab:blue"), ("retied", "tab:orange"), ("untied", "tab:green")):
            ax.plot(x, [r.get(key, 0) for r in d], label=key, color=color, lw=1)
        ax.plot(x, [r["n_independent"] for r in d], label="independent after", color="k", lw=1.5, ls="--")
        ax.legend(fontsize=7, ncol=4)
    else:
        ax.text(0.5, 0.5, "no decisions (static tie map)", ha="center", transform=ax.transAxes)
    ax.set_xlabel("decision")
    ax.set_ylabel("blocks")
    ax.set_title(f"Fig. 2 tie / untie events per decision ({run['label']})", fontsize=9)
    return _save(fig, path)


def plot_trainable_steps(run: dict, path: str) -> str:
    counts = trainable_steps(run)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(range(len(counts)), counts, color="tab:purple")
    ax.axhline(run["summary"]["steps"], color="k", lw=0.8, ls=":")
    ax.set_xlabel("block")
    ax.set_ylabel("steps with own weights")
    ax.set_xticks(range(len(counts)))
    ax.set_title(f"Fig. 3 steps each block was trainable ({run['label']})", fontsize=9)
    return _save(fig, path)


def plot_mlp_correlation(run_dir: str, run: dict, path: str) -> str:
    weights = mlp_weights(run_dir)
    blocks = list(weights)
    corr = np.corrcoef(np.stack([weights[b] for b in blocks])) if len(blocks) > 1 else np.ones((1, 1))
    fig, ax = plt.subplots(figsize=(4.4, 4))
    # Blocks split from one root stay highly correlated; a [-1, 1] scale would paint them one colour.
    low = max(-1.0, math.floor(float(corr.min()) * 20) / 20)
    im = ax.imshow(corr, vmin=min(low, 0.95), vmax=1, cmap="viridis")
    ax.set_xticks(range(len(blocks)), blocks)
    ax.set_yticks(range(len(blocks)), blocks)
    if len(blocks) <= 8:
        for i in range(len(blocks)):
            for j in range(len(blocks)):
                ax.text(j, i, f"{corr[i, j]:.3f}", ha="center", va="center", fontsize=7, color="k")
    ax.set_xlabel("independent block")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(f"Fig. 4 Pearson r of MLP weights ({run['label']})", fontsize=9)
    return _save(fig, path)


def make_figures(run_dir: str, out_dir: str, prefix: str = "", label: str | None = None) -> list[str]:
    """Write the four figures of one run as PNGs; returns their paths."""
    run = load_run(run_dir)
    run["label"] = label or run["config"]["tie_policy"]
    os.makedirs(out_dir, exist_ok=True)
    p = os.path.join(out_dir, prefix)
    return [plot_replication_map(run, p + "fig1_replication_map.png"),
            plot_tie_events(run, p + "fig2_tie_events.png"),
            plot_trainable_steps(run, p + "fig3_trainable_steps.png"),
            plot_mlp_correlation(run_dir, run, p + "fig4_mlp_correlation.png")]


def plot_validation_curves(run_dirs: dict[str, str], path: str, title: str = "") -> str:
    """Validation perplexity against step for several runs (one line each, log scale): where each
    row peaks and how fast it overfits, the curve the best-on-validation numbers are read from."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = 0
    for label, run_dir in run_dirs.items():
        evals = [e for e in load_run(run_dir)["evals"] if math.isfinite(e.get("val_ppl", math.nan))]
        if not evals:
            continue
        steps, ppl = [e["step"] for e in evals], [e["val_ppl"] for e in evals]
        best = int(np.argmin(ppl))
        line, = ax.plot(steps, ppl, marker=".", label=f"{label} (best {ppl[best]:.1f} @ {steps[best]})")
        ax.plot([steps[best]], [ppl[best]], "o", color=line.get_color(), markersize=7, fillstyle="none")
        drawn += 1
    if not drawn:
        plt.close(fig)
        raise ConfigError("no run with validation evaluations to plot")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation perplexity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title or "validation perplexity", fontsize=9)
    return _save(fig, path)
