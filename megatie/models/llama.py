"""A Llama-style decoder (`LlamaForCausalLM`, built from a config: no weights are downloaded).

RMSNorm, rotary positions, a SwiGLU MLP and grouped-query attention, from the same shape settings as
GPT-2's: ``n_embd`` is the hidden size, ``n_head`` the query heads, half as many key/value heads when
``n_head`` is even (grouped-query attention), and an MLP width of 8/3 ``n_embd`` rounded up to a multiple
of 64, as Llama sizes its SwiGLU. The input embedding and the LM head are tied, as in GPT-2 and the
small Llama 3.2 models, so both families spend their parameters on blocks the same way.
"""

from __future__ import annotations

from megatie.models.spec import ModelSpec, quiet_build


def swiglu_width(n_embd: int, multiple: int = 64) -> int:
    return -(-(8 * n_embd // 3) // multiple) * multiple


def kv_heads(n_head: int) -> int:
    return n_head // 2 if n_head % 2 == 0 else n_head


def build_llama(n_layer: int, n_embd: int, n_head: int, seq_len: int, vocab_size: int,
                dropout: float = 0.0, seed: int | None = None, device="cpu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        num_hidden_layers=n_layer, hidden_size=n_embd, num_attention_heads=n_head,
        num_key_value_heads=kv_heads(n_head), intermediate_size=swiglu_width(n_embd),
        max_position_embeddings=seq_len, vocab_size=vocab_size, attention_dropout=dropout,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1,
    )
    return quiet_build(LlamaForCausalLM, config, seed, device)


SPEC = ModelSpec(name="llama", build=build_llama, block_path="model.layers", hf_class="LlamaForCausalLM")
