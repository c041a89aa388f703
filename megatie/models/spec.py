"""What megatie needs to know about a model family, and the shared way of building one."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers.utils import logging as hf_logging


@dataclass(frozen=True)
class ModelSpec:
    name: str
    # build(n_layer, n_embd, n_head, seq_len, vocab_size, dropout, seed=..., device=...) -> a transformers model
    build: Callable[..., torch.nn.Module]
    block_path: str           # where the stack of identical blocks lives (what LayerTying ties)
    hf_class: str             # the transformers class a run of this family leaves behind
    objective: str = "causal"  # causal language modelling: loss, perplexity and generation as GPT-2's


def quiet_build(cls, config, seed: int | None, device) -> torch.nn.Module:
    """``cls(config)`` initialised from ``seed`` without touching the global RNG, directly on ``device``
    (a 1.5B-parameter model initialised on the host first would spend tens of seconds in CPU random
    number generation before it ever reached the GPU), without transformers' per-build warnings."""
    # Pin the attention kernel so results do not depend on what else happens to be installed.
    config._attn_implementation = "sdpa"
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            with torch.device(device):
                model = cls(config)
        model.loss_type = "ForCausalLM"  # names the loss explicitly (otherwise a warning per run)
        return model
    finally:
        hf_logging.set_verbosity(verbosity)
