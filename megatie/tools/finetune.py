"""Fine-tuning a trained model for sequence classification, its tie map frozen.

The paper's Appendix C fine-tunes its tied GPT-2 on GLUE keeping the structure it ended with. Here:
the backbone comes from a run directory or either export; a ``GPT2ForSequenceClassification``
gets its weights and is re-tied to the same tie map (members hold their root's very ``Parameter``,
so the optimizer sees each group once and a shared block stays shared); a fresh linear head reads
the last token of each text. Accuracy on held-out examples is reported after every epoch next to
the majority-class baseline. The result is a standard transformers directory
(``AutoModelForSequenceClassification`` loads it) with the tie map in its config, written into a
temporary directory and renamed into place.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict

import torch

from megatie.config import FinetuneConfig
from megatie.data.labeled import Examples, check_classes, load_examples
from megatie.errors import ConfigError
from megatie.tools.export import TIE_STATE_KEY


def load_backbone(source: str, checkpoint: str = "best"):
    """``(config, weights, tie_state, tokenizer_dir)`` of a run directory or a megatie export;
    ``weights`` name every tensor of a GPT-2 LM, a tied block's taken from its root."""
    from megatie.tools.export import (
        COMPACT_MAP,
        is_run_dir,
        load_compact,
        load_run,
        plain_tie_state,
        untied_state_dict,
    )

    if is_run_dir(source):
        model, tying, settings = load_run(source, checkpoint)
        if settings.get("model", "gpt2") != "gpt2":
            raise ConfigError(f"{source!r} is a {settings['model']} run; fine-tuning takes GPT-2 runs so far")
        # Relaxed positions differ beyond their root's weights: they are fine-tuned untied, as exported.
        state = plain_tie_state(tying) or list(range(model.config.n_layer))
        return model.config, untied_state_dict(model, tying), state, os.path.join(source, "tokenizer")
    if os.path.isfile(os.path.join(source, COMPACT_MAP)):
        model = load_compact(source)
        if model.config.model_type != "gpt2":
            raise ConfigError(f"{source!r} holds a {model.config.model_type} model; fine-tuning takes GPT-2 so far")
        state = plain_tie_state(model.megatie_tying) or list(range(model.config.n_layer))
        return model.config, untied_state_dict(model, model.megatie_tying), state, source
    if os.path.isfile(os.path.join(source, "config.json")):
        from transformers import GPT2LMHeadModel

        from megatie.runtime.trusted_dirs import (
            NO_REMOTE_CODE,
            read_descriptor,
            refuse_remote_code,
        )

        refuse_remote_code(source)
        if "GPT2LMHeadModel" not in (read_descriptor(os.path.join(source, "config.json")).get("architectures") or []):
            raise ConfigError(f"{source!r} does not hold a GPT-2 language model to fine-tune")
        model = GPT2LMHeadModel.from_pretrained(source, **NO_REMOTE_CODE)
        state = getattr(model.config, TIE_STATE_KEY, None) or list(range(model.config.n_layer))
    else:
        raise ConfigError(f"{source!r} is neither a run directory nor a megatie export")
    return model.config, {k: v.detach().clone() for k, v in model.state_dict().items()}, list(state), source


def build_classifier(lm_config, weights: dict, state: list[int], class_values: list[int], pad_id: int):
    """``(model, tying)``: GPT-2 with a classification head, the backbone's weights, re-tied to ``state``."""
    from transformers import GPT2ForSequenceClassification

    from megatie.tying.layers import LayerTying

    config = lm_config.__class__.from_dict(lm_config.to_dict())
    config.num_labels = len(class_values)
    config.id2label = {i: str(v) for i, v in enumerate(class_values)}
    config.label2id = {str(v): i for i, v in enumerate(class_values)}
    config.pad_token_id = pad_id
    config.architectures = ["GPT2ForSequenceClassification"]
    setattr(config, TIE_STATE_KEY, list(state))
    model = GPT2ForSequenceClassification(config)
    backbone = {k: v for k, v in weights.items() if k.startswith("transformer.")}
    missing, unexpected = model.load_state_dict(backbone, strict=False)
    if unexpected or set(missing) - {"score.weight"}:
        raise ConfigError(f"the backbone does not fit GPT-2 (missing {missing[:3]}, unexpected {unexpected[:3]})")
    tying = LayerTying(model, "shared", "transformer.h")
    tying.initialize(state)  # members now hold their root's Parameter: one tensor, one optimizer entry
    return model, tying


def encode_examples(tokenizer, examples: Examples, classes: list[int], max_length: int):
    """Token ids (each text cut to its first ``max_length`` tokens) and class indices of ``examples``."""
    index = {v: i for i, v in enumerate(classes)}
    ids = [tokenizer.encode(text)[:max_length] or [tokenizer.eos_id] for text in examples.texts]
    return ids, torch.tensor([index[v] for v in examples.labels])


def _batches(ids: list[list[int]], labels: torch.Tensor, batch_size: int, pad_id: int, order: torch.Tensor):
    for start in range(0, len(ids), batch_size):
        chosen = order[start:start + batch_size].tolist()
        width = max(len(ids[i]) for i in chosen)
        input_ids = torch.full((len(chosen), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, i in enumerate(chosen):  # right padding: the head reads the last real token
            input_ids[row, :len(ids[i])] = torch.tensor(ids[i])
            mask[row, :len(ids[i])] = 1
        yield input_ids, mask, labels[chosen]


@torch.no_grad()
def accuracy(model, ids, labels: torch.Tensor, batch_size: int, pad_id: int) -> float:
    model.eval()
    correct = 0
    for input_ids, mask, y in _batches(ids, labels, batch_size, pad_id, torch.arange(len(ids))):
        correct += int((model(input_ids=input_ids, attention_mask=mask).logits.argmax(-1) == y).sum())
    return correct / len(ids)


def finetune(cfg: FinetuneConfig, examples: tuple[Examples, Examples] | None = None) -> dict:
    """Fine-tune, write the result to ``cfg.out_dir`` and return the summary (also ``finetune.json``).
    ``examples``: ``(train, held_out)`` as ``load_examples(cfg)`` gives them, if the caller has read them."""
    from megatie.tools.export import write_into
    from megatie.tools.inference import tokenizer_in

    cfg.validate()
    train_set, held_set = examples or load_examples(cfg)  # every row checked before the model loads
    classes = check_classes(train_set, held_set)
    lm_config, weights, state, tokenizer_dir = load_backbone(cfg.source, cfg.checkpoint)
    tokenizer = tokenizer_in(tokenizer_dir)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None and tokenizer.pad_id >= 0 else tokenizer.eos_id
    max_length = min(cfg.max_length or lm_config.n_positions, lm_config.n_positions)
    torch.manual_seed(cfg.seed)
    model, tying = build_classifier(lm_config, weights, state, classes, pad_id)
    train_ids, train_y = encode_examples(tokenizer, train_set, classes, max_length)
    held_ids, held_y = encode_examples(tokenizer, held_set, classes, max_length)
    history = _train(model, cfg, train_ids, train_y, held_ids, held_y, pad_id)
    majority = max(classes, key=train_set.labels.count)
    summary = {"held_out_accuracy": history[-1]["held_out_accuracy"],
               "majority_baseline": sum(v == majority for v in held_set.labels) / len(held_set),
               "train_examples": len(train_set), "held_out_examples": len(held_set), "classes": classes,
               "tie_state": list(tying.state), "independent_blocks": tying.num_independent(),
               "trainable_params": sum(p.numel() for p in model.parameters()), "epochs": history,
               "settings": asdict(cfg)}
    write_into(cfg.out_dir, lambda tmp: _write_result(model, tying, tokenizer_dir, summary, tmp))
    return summary


def _train(model, cfg: FinetuneConfig, train_ids, train_y, held_ids, held_y, pad_id: int) -> list[dict]:
    from tqdm import tqdm

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    history = []
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        start, total, steps = time.perf_counter(), 0.0, 0
        order = torch.randperm(len(train_ids), generator=generator)
        batches = _batches(train_ids, train_y, cfg.batch_size, pad_id, order)
        for input_ids, mask, y in tqdm(batches, total=-(-len(train_ids) // cfg.batch_size), disable=not cfg.progress,
                                       desc=f"epoch {epoch}/{cfg.epochs}", dynamic_ncols=True):
            loss = model(input_ids=input_ids, attention_mask=mask, labels=y).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, steps = total + loss.item(), steps + 1
        history.append({"epoch": epoch, "train_loss": total / steps, "seconds": time.perf_counter() - start,
                        "held_out_accuracy": accuracy(model, held_ids, held_y, cfg.batch_size, pad_id)})
        if cfg.progress:
            print(json.dumps(history[-1]))
    return history


def _write_result(model, tying, tokenizer_dir: str, summary: dict, tmp: str) -> None:
    from transformers import GPT2ForSequenceClassification

    from megatie.data.hf_tokenizer import export_tokenizer
    from megatie.metrics.logger import MetricsLogger
    from megatie.tools.export import untied_state_dict

    export_tokenizer(tokenizer_dir, tmp, model.config.n_positions)
    model.config._attn_implementation = None  # let the loading side choose its attention kernel
    plain = GPT2ForSequenceClassification(model.config)
    plain.load_state_dict(untied_state_dict(model, tying))  # every block a tensor of its own
    plain.save_pretrained(tmp, safe_serialization=True)
    logger = MetricsLogger(tmp)
    for row in summary["epochs"]:
        logger.log({"event": "finetune", **row}, row["epoch"], prefix="finetune/")
    logger.close()
    with open(os.path.join(tmp, "finetune.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
