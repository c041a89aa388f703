"""The vocabulary padded inside the model only: embedding and LM-head rows up to a multiple of
``--pad-vocab-to`` (default 128), so the two largest matrices of a small model have tensor-core
friendly shapes (GPT-2's 50257 becomes 50304, as in nanoGPT).

The padding never leaves the model:

- no token id reaches it: the data holds the tokenizer's ids, so labels never name a padded id;
- its logits are set to -inf before the loss (``mask_padded_logits``). nanoGPT leaves them to be
  learnt down instead, which costs a little probability mass early on and makes the training loss
  and perplexity depend on the padding. Masked, they are exactly those of the unpadded vocabulary:
  the padded rows get no gradient from the loss (weight decay alone shrinks them), sampling can
  never pick a padded id, and a run's own evaluation agrees with its export's;
- a run read back for use (``megatie.tools.export.load_run``: export, eval, generate, finetune) is cut to
  the tokenizer's vocabulary (``unpad_vocab``), so an export loads with ``from_pretrained`` next to
  its tokenizer with matching sizes.

Parameter counts of a training run (``trainable_params``, ``total_params`` in the summary) are those
of the tensors the optimizer holds: they include the padding rows (``padded_vocab_size`` says how
many rows there are). Model FLOPs count the LM head at its padded width, the work the GPU does.
"""

from __future__ import annotations

import torch

SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    return -(-vocab_size // multiple) * multiple


def mask_padded_logits(model, vocab_size: int):
    """Logits of ids ``>= vocab_size`` become -inf, in place on the LM head's output (a slice of it:
    no copy of the logits). Returns the hook's handle."""

    def hook(module, args, logits):
        if logits.shape[-1] > vocab_size:
            logits[..., vocab_size:] = float("-inf")

    return model.get_output_embeddings().register_forward_hook(hook)


def build_lm(spec, settings, *, seed: int | None = None, device: torch.device | str = "cpu", dropout=None,
             pad_to: int = 1):
    """``spec.build_for(settings)`` with a language model's vocabulary padded to a multiple of ``pad_to``
    and the padding masked (an image classifier's classes are not padded)."""
    if spec.objective == "image":
        return spec.build_for(settings, seed=seed, device=device, dropout=dropout)
    vocab_size = settings["vocab_size"]
    padded = padded_vocab_size(vocab_size, pad_to)
    model = spec.build_for({**settings, "vocab_size": padded}, seed=seed, device=device, dropout=dropout)
    if padded != vocab_size:
        # The builders name the last id as the end of text; no tokenizer produces a padded id, so
        # point such ids at the real vocabulary's last, as the unpadded build does.
        for holder in (model.config, getattr(model, "generation_config", None)):
            for key in SPECIAL_IDS:
                value = getattr(holder, key, None)
                if isinstance(value, int) and value >= vocab_size:
                    setattr(holder, key, vocab_size - 1)
        model._megatie_vocab_mask = mask_padded_logits(model, vocab_size)
    return model


def unpad_vocab(model, vocab_size: int):
    """Cut the embedding and LM head (tied or not) back to ``vocab_size`` rows, in place."""
    if vocab_size is None or model.get_input_embeddings().num_embeddings == vocab_size:  # images: no vocabulary
        return model
    handle = model.__dict__.pop("_megatie_vocab_mask", None)
    if handle is not None:
        handle.remove()
    # transformers initialises the new matrices before copying the kept rows: not from the global RNG.
    with torch.random.fork_rng(devices=[]):
        model.resize_token_embeddings(vocab_size)
    return model
