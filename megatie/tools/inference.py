"""Using a trained model: perplexity on any text file, and sampling - from a run directory, its
Hugging Face export or its compact export, with the same numbers from each.

Text is tokenized as training tokenized it (one line at a time, each followed by the end-of-line
id), with SentencePiece's own model where one is present, then cut into non-overlapping windows of
the model's context; perplexity is the exponential of the mean loss over every predicted token.
"""

from __future__ import annotations

import math
import os

import torch

from megatie.errors import ConfigError, DataError


def context_length(config) -> int:
    """Positions the model can attend over (GPT-2 calls it n_positions, Llama max_position_embeddings)."""
    return int(getattr(config, "n_positions", None) or config.max_position_embeddings)


def load_for_inference(source: str, checkpoint: str = "best"):
    """``(model, tokenizer)`` from a run directory, an ``hf`` export or a ``compact`` export."""
    from megatie.runtime.trusted_dirs import refuse_remote_code
    from megatie.tools.export import COMPACT_MAP, is_run_dir, load_compact, load_run

    if not os.path.isdir(source):
        raise ConfigError(f"{source!r} is not a directory (a run directory or a megatie export)")
    refuse_remote_code(source)
    _refuse_non_causal(source)
    if is_run_dir(source):
        model = load_run(source, checkpoint)[0]
        tokenizer_dir = os.path.join(source, "tokenizer")
    elif os.path.isfile(os.path.join(source, COMPACT_MAP)):
        model, tokenizer_dir = load_compact(source), source
    elif os.path.isfile(os.path.join(source, "config.json")):
        model, tokenizer_dir = _hf_export(source), source
    else:
        raise ConfigError(f"{source!r} is neither a run directory nor a megatie export")
    return model, tokenizer_in(tokenizer_dir)


def _hf_export(source: str):
    """A causal LM exported in transformers' format: its own classes only, never the directory's code."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from megatie.runtime.trusted_dirs import NO_REMOTE_CODE

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # a mismatch is reported below in one line, not as transformers' table
    hf_logging.disable_progress_bar()
    try:
        return AutoModelForCausalLM.from_pretrained(source, **NO_REMOTE_CODE).eval()
    except (OSError, ValueError, KeyError, RuntimeError) as e:  # RuntimeError: weights of another shape
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "mismatched" in why:
            why = "its weights do not have the shapes its config.json gives"
        raise ConfigError(f"{source!r} does not hold a causal language model transformers can load: {why}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _refuse_non_causal(source: str) -> None:
    """Perplexity over a text and sampling are what causal language models do: a run's config.json names
    its family, an export's its transformers class."""
    import json

    try:
        with open(os.path.join(source, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return  # the loaders below say what is wrong
    family = config.get("model") or (config.get("architectures") or ["ForCausalLM"])[0]
    if family in ("bert", "vit") or family.endswith(("ForMaskedLM", "ForImageClassification")):
        use = "image-classification" if "vit" in family.lower() else "fill-mask"
        raise ConfigError(f"{source} holds a {family} model; eval and generate are for causal language models "
                          f"(gpt2, llama): use transformers' {use} pipeline on its export")


def tokenizer_in(directory: str):
    """megatie's tokenizer from a directory: SentencePiece's own model if present, else transformers'."""
    from megatie.data.tokenizers import (
        HFTokenizer,
        SentencePieceTokenizer,
        read_tokenization,
    )

    sp_model = os.path.join(directory, "tokenizer.model")
    if os.path.isfile(sp_model):
        return SentencePieceTokenizer(sp_model, read_tokenization(directory))
    if os.path.isdir(directory) and os.listdir(directory):
        return HFTokenizer(directory, read_tokenization(directory))
    raise ConfigError(f"no tokenizer in {directory!r}")


def _token_ids(tokenizer, path: str) -> torch.Tensor:
    from megatie.data.sources import check_text_file, file_line_stream, resolve_files

    files = resolve_files(path)
    for f in files:
        check_text_file(f)
    ids: list[int] = []
    for lines in file_line_stream(files)():
        for row in tokenizer.encode_lines(lines):
            ids.extend(row)
    if len(ids) < 2:
        raise DataError(f"{path} holds fewer than two tokens; nothing to predict")
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def perplexity(model, tokenizer, path: str, batch_size: int = 8) -> dict:
    """Perplexity of ``model`` on the text of ``path`` (every token but each window's first predicted)."""
    ids = _token_ids(tokenizer, path)
    window = context_length(model.config)
    windows = [ids[i:i + window] for i in range(0, len(ids), window)]
    windows = [w for w in windows if len(w) > 1]
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        for w in windows[start:start + batch_size]:  # unequal last window: one at a time is exact
            n = len(w) - 1
            total += float(model(input_ids=w[None], labels=w[None]).loss) * n
            count += n
    loss = total / count
    return {"file": os.path.abspath(path), "tokens": int(len(ids)), "predicted_tokens": count, "loss": loss,
            "ppl": math.exp(min(loss, 80.0)), "context": window}


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 50, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0) -> str:
    """Sample a continuation of ``prompt`` with transformers' ``generate`` (greedy at temperature 0)."""
    ids = tokenizer.encode(prompt)
    context = context_length(model.config)
    if not ids:
        raise ConfigError("the prompt is empty")
    if len(ids) + max_new_tokens > context:
        raise ConfigError(f"the prompt is {len(ids)} tokens and --max-new-tokens {max_new_tokens}: more than the "
                          f"model's context of {context} tokens; shorten the prompt or ask for fewer tokens")
    torch.manual_seed(seed)
    sampling = temperature > 0
    options = {"do_sample": sampling, "max_new_tokens": max_new_tokens,
               "pad_token_id": model.config.pad_token_id if model.config.pad_token_id is not None
               else model.config.eos_token_id}
    if sampling:
        options.update(temperature=temperature, top_k=top_k or 0, top_p=top_p if top_p is not None else 1.0)
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), **options)
    new = out[0, len(ids):].tolist()
    # Decoded with its prompt, then cut: a continuation decoded alone would lose the space it starts with.
    full, head = tokenizer.decode(ids + new), tokenizer.decode(ids)
    return full[len(head):] if full.startswith(head) else tokenizer.decode(new)
