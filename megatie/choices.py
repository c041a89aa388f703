"""The names the launcher flags accept, and the presets, as plain data.

They live apart from the modules that implement them (``agent``, ``policies``, ``tying``), which
import torch: building the argument parser and validating a ``TrainConfig`` must not pay for that,
so ``--help`` and a mistyped flag answer at once. Those modules re-export these names.
"""

from __future__ import annotations

# Model families (``megatie.models.<name>`` builds each) and the launcher that trains each by default.
MODEL_FAMILIES: tuple[str, ...] = ("gpt2", "llama", "bert", "vit")

# Model shapes and the run length that suits them. `tiny` is sized for a CPU: a 60-step run takes
# about a minute on two cores. `paper` is the paper's GPT-2 (48 blocks, d=1600, 16 heads).
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=12, n_embd=128, n_head=4, seq_len=128, batch_size=8, lr=6e-4, max_steps=300,
                 vocab_size=4096),
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12, seq_len=256, batch_size=16, lr=1e-4, max_steps=20000),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16, seq_len=256, batch_size=16, lr=1e-4,
                        max_steps=20000),
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20, seq_len=256, batch_size=16, lr=1e-4,
                       max_steps=20000),
    "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25, seq_len=256, batch_size=16, lr=1e-4, max_steps=20000),
    "paper": dict(n_layer=48, n_embd=1600, n_head=16, seq_len=256, batch_size=16, lr=1e-4, max_steps=20000),
}

# Tying policies by launcher name, with the one-line description --help shows (``build_policy``
# implements them).
POLICIES: dict[str, str] = {
    "conventional": "no tying: every block trains its own weights",
    "qlearning": "the paper's Q-learning agent (frozen start, eps-greedy, TD updates), as published",
    "vanilla": "(i) conventional with as many blocks as the reference run ended with",
    "static": "(ii) the reference run's final tie map (or --static-state) from the start",
    "replay-permuted": "(iii) the reference run's states under a fixed permutation of blocks",
    "replay": "(iv) the reference run's states, replayed without Q",
    "replicate-only": "(v) replicate weights at decisions but never tie",
    "all-trainable": "(vi) Q-learning with every block trainable at init (no frozen phase)",
    "cycle": "(vii) block L/2+i tied to block i",
    "cycle-rev": "(viii) block i >= L/2 tied to block L-1-i",
    "sequence": "(ix) block 2m+1 tied to block 2m",
    "alternate": "block i tied to block i mod 2 (two independent blocks)",
    "split": "the default; adapts to the data: all blocks share block 0, then, while --param-budget allows, "
             "the group whose members' gradients disagree most is split in two at each decision",
    "grow": "all blocks share block 0's weights, then split into --grow-final groups (--grow-layout) "
            "in equal stages after --grow-start of training (no learning)",
}

GROW_LAYOUTS = ("contiguous", "cyclic")
LR_SCHEDULES = ("cosine", "constant")

# Q-learning agent options (see ``megatie.agent``).
REWARDS = ("neg-ppl", "neg-loss", "loss-drop")
REWARD_NORMS = ("none", "running")
MOVES = ("vector", "local")

# How a tied member holds its root's weights (see ``megatie.tying``).
TIE_MODES = ("shared", "frozen-replica")
