"""Tiny Hugging Face models for tests (random init, no downloads)."""

import torch
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()

VOCAB = 97


def tiny_model(kind: str, n_layer: int = 6, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = GPT2Config(n_layer=n_layer, n_embd=32, n_head=4, n_positions=32, vocab_size=VOCAB,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        cls = GPT2LMHeadModel
    elif kind == "bert":
        cfg = BertConfig(num_hidden_layers=n_layer, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                         vocab_size=VOCAB, max_position_embeddings=32, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)
        cls = BertForMaskedLM
    elif kind == "llama":
        cfg = LlamaConfig(num_hidden_layers=n_layer, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32)
        cls = LlamaForCausalLM
    else:
        raise ValueError(kind)
    cfg._attn_implementation = "sdpa"
    return cls(cfg)


def lm_loss(model, batch):
    labels = batch.clone()
    return model(input_ids=batch, labels=labels).loss
