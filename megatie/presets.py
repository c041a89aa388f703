"""Model shapes and run lengths by name (``--preset``), as plain data.

A family may adjust a preset for itself (``megatie.models.<family>``: its spec's ``presets``); the
launcher flags override either. The DeepSpeed JSON files hold engine settings only.
"""

from __future__ import annotations

# Model shapes and the run length that suits them. `tiny` is sized for a CPU: a 60-step run takes
# about a minute on two cores. `deep` is the smallest shape found where depth pays on a CPU: with a
# SentencePiece vocabulary of 512 (the blocks hold 88% of the parameters) and conventional's best
# learning rate, 6 blocks of d=64 beat the best untied model with a third of their parameters by 5.3%
# test perplexity on WikiText-2 in 1800 steps (3 seeds; ~5 min on one core), by less on other text
# (benchmarks/RESULTS.md). Roots shared by three or more positions may stall at this rate with the
# default warm-up: give them --warmup-steps 400. `paper` is the paper's GPT-2 (48 blocks, d=1600).
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=12, n_embd=128, n_head=4, seq_len=128, batch_size=8, lr=6e-4, max_steps=300,
                 vocab_size=4096),
    "deep": dict(n_layer=6, n_embd=64, n_head=2, seq_len=128, batch_size=16, lr=8e-3, max_steps=1800,
                 vocab_size=512),
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12, seq_len=256, batch_size=16, lr=1e-4, max_steps=20000),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16, seq_len=256, batch_size=16, lr=1e-4,
                        max_steps=20000),
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20, seq_len=256, batch_size=16, lr=1e-4,
                       max_steps=20000),
    "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25, seq_len=256, batch_size=16, lr=1e-4, max_steps=20000),
    "paper": dict(n_layer=48, n_embd=1600, n_head=16, seq_len=256, batch_size=16, lr=1e-4, max_steps=20000),
}
