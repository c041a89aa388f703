"""GPT-2 (`GPT2LMHeadModel`): learned positions, LayerNorm, GELU MLP, embedding and LM head tied."""

from __future__ import annotations

from megatie.models.spec import ModelSpec, quiet_build


def build_gpt2(n_layer: int, n_embd: int, n_head: int, seq_len: int, vocab_size: int,
               dropout: float = 0.0, seed: int | None = None, device="cpu"):
    """A randomly initialised ``GPT2LMHeadModel`` built directly on ``device``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=seq_len, vocab_size=vocab_size,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
        bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1,
    )
    return quiet_build(GPT2LMHeadModel, config, seed, device)


SPEC = ModelSpec(name="gpt2", build=build_gpt2, block_path="transformer.h", hf_class="GPT2LMHeadModel")
