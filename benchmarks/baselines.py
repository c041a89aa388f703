"""What a model that learned nothing but the label frequencies scores, from a finished run's own data:
the unigram perplexity of the validation tokens (language models; for masked LM over the tokens masking
can choose) and the majority-class accuracy (images). A run is only worth reading below / above it."""
from __future__ import annotations

import json
import math
import os

import numpy as np


def trivial_baseline(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    if cfg.get("model") == "vit":
        from megatie.data.images import load_image_data

        data = load_image_data(cfg["image_dir"], cfg["dataset"], cfg["image_size"], cfg["patch_size"])
        return {"name": "majority class", "accuracy": data.majority_accuracy("valid")}
    return {"name": "unigram", "ppl": unigram_ppl(cfg, masked=cfg.get("model") == "bert")}


def unigram_ppl(cfg: dict, masked: bool) -> float:
    """exp of the cross-entropy of validation tokens under the training tokens' frequencies (add-one)."""
    from megatie.data import build_lm_data

    data = build_lm_data(train_files=cfg["train_files"] or None, valid_files=cfg["valid_files"] or None,
                         dataset=cfg["dataset"], dataset_dir=cfg["dataset_dir"], tokenizer=cfg["tokenizer"],
                         vocab_size=cfg["vocab_size"], seq_len=cfg["seq_len"], cache_dir=cfg["cache_dir"],
                         data_dir=cfg["data_dir"])
    counts = _counts(data, "train", data.vocab_size) + 1.0
    valid = _counts(data, "valid", data.vocab_size)
    if masked:  # masking never chooses special tokens: neither predicts nor is scored on them
        special = [i for i in (data.tokenizer.eos_id, data.tokenizer.bos_id, data.tokenizer.pad_id,
                               data.tokenizer.mask_id) if i is not None and 0 <= i < data.vocab_size]
        counts[special] = 0.0
        valid[special] = 0.0
    log_p = np.log(counts / counts.sum(), where=counts > 0, out=np.zeros_like(counts))
    return math.exp(-(valid * log_p).sum() / valid.sum())


def _counts(data, split: str, vocab: int) -> np.ndarray:
    tokens = data._split(split)
    out = np.zeros(vocab, dtype=np.float64)
    for seg in tokens.segments:
        out += np.bincount(np.asarray(seg, dtype=np.int64), minlength=vocab)[:vocab]
    return out
