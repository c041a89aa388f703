"""Hugging Face models built from scratch for a run (no weights are downloaded)."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging


def build_gpt2(n_layer: int, n_embd: int, n_head: int, seq_len: int, vocab_size: int,
               dropout: float = 0.0, seed: int | None = None, device: torch.device | str = "cpu") -> GPT2LMHeadModel:
    """A randomly initialised ``GPT2LMHeadModel`` (embedding and LM head tied, as in GPT-2), built
    directly on ``device``: a 1.5B-parameter model initialised on the host first would spend tens of
    seconds in CPU random number generation before it ever reached the GPU."""
    config = GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=seq_len, vocab_size=vocab_size,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
        bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1,
    )
    # Pin the attention kernel so results do not depend on what else happens to be installed.
    config._attn_implementation = "sdpa"
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            with torch.device(device):
                model = GPT2LMHeadModel(config)
        model.loss_type = "ForCausalLM"  # names the loss explicitly (otherwise a warning per run)
        return model
    finally:
        hf_logging.set_verbosity(verbosity)
