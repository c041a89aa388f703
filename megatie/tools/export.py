"""Taking a model out of a run: a standard Hugging Face directory, or a compact one with the tie map.

A run directory holds verified checkpoints (each distinct tensor once: a tied block is stored at its
root), ``config.json`` (every setting) and ``tokenizer/`` (the tokenizer it trained with). From them:

- ``hf``: every block gets its root's weights as tensors of its own, so any ``transformers`` install
  loads the result with ``AutoModelForCausalLM.from_pretrained`` - no megatie, no remote code - and
  computes megatie's logits. The SentencePiece model becomes a fast tokenizer (``tokenizer.json``);
  ``tokenizer.model`` is kept next to it.
- ``compact``: only the independent blocks (plus embeddings and the final norm) and ``tie_map.json``;
  ``load_compact`` rebuilds the model with the ties as shared tensors, not copies.

Everything is written into a temporary directory and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from megatie.checkpoint.store import (
    list_checkpoints,
    load_checkpoint,
    load_model_tensors,
)
from megatie.errors import CheckpointError, ConfigError
from megatie.tying.tie_map import num_independent

COMPACT_MAP = "tie_map.json"
TIE_STATE_KEY = "megatie_tie_state"  # in an hf export's config: the tie map its weights were trained with
FORMATS = ("hf", "compact")


# ---------------------------------------------------------------------- reading a run
def checkpoint_of(run_dir: str, which: str = "best") -> str:
    """``best``, ``final`` (the newest step) or a checkpoint name under ``run_dir/checkpoints``."""
    root = os.path.join(run_dir, "checkpoints")
    if which == "final":
        found = list_checkpoints(root)
        if not found:
            raise CheckpointError(f"{run_dir!r} has no step checkpoint (a run with --no-checkpoints cannot be "
                                  "exported)")
        return found[-1]
    path = os.path.join(root, which)
    if not os.path.isfile(os.path.join(path, "meta.json")):
        names = sorted(os.listdir(root)) if os.path.isdir(root) else []
        listed = ", ".join(n for n in names if not n.startswith(".")) or "none"
        raise CheckpointError(f"{run_dir!r} has no checkpoint {which!r} (it has: {listed})")
    return path


def is_run_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(os.path.join(path, "metrics.jsonl"))


def load_run(run_dir: str, which: str = "best"):
    """``(model, tying, settings)``: the run's model with its ties, weights of checkpoint ``which``,
    its vocabulary the tokenizer's (a padded run's extra rows cut off)."""
    from megatie.config import BEFORE_SETTING
    from megatie.models import get_spec
    from megatie.models.vocab import build_lm, unpad_vocab
    from megatie.tying.layers import tying_for

    if not is_run_dir(run_dir):
        raise ConfigError(f"{run_dir!r} is not a run directory (config.json and metrics.jsonl needed)")
    checkpoint = load_checkpoint(checkpoint_of(run_dir, which))
    settings = checkpoint.settings
    spec = get_spec(settings.get("model", "gpt2"))  # runs from before families were named are GPT-2
    pad_to = settings.get("pad_vocab_to", BEFORE_SETTING["pad_vocab_to"])
    model = build_lm(spec, settings, seed=0, dropout=0.0, pad_to=pad_to)
    tying = tying_for(model, spec.block_path, settings)
    tying.load_state_dict(checkpoint.trainer_state["controller"]["tying"])
    load_model_tensors(model, checkpoint.tensors)
    unpad_vocab(model, settings["vocab_size"])  # the tokenizer's vocabulary: what exports and sampling see
    model.eval()
    return model, tying, settings


def untied_state_dict(model, tying) -> dict[str, torch.Tensor]:
    """Every tensor name of the plain model, each block's what it computes with: its root's tensors, its
    own private ones, its delta folded in (never a stale copy; the deltas' own names left out)."""
    from megatie.tying.relax import is_delta_name

    effective = {tying.param_name(i, k): t for i in range(tying.num_blocks)
                 for k, t in enumerate(tying.effective_tensors(i))}
    return {name: effective.get(name, tensor).detach().clone().contiguous()
            for name, tensor in model.state_dict().items() if not is_delta_name(name)}


def plain_tie_state(tying) -> list[int] | None:
    """The tie map a plain model can be re-tied with (fine-tuning), or None where positions differ beyond
    their root's weights (relaxed ties, tied parts) or the map covers only some blocks (kept-unique)."""
    plain = not tying.relax.any and tying.parts == "all" and tying.keep_unique == "none"
    return list(tying.state) if plain else None


def relax_record(tying) -> dict:
    """How the ties were relaxed, as recorded in exports and their cards."""
    return {"relax": str(tying.relax), "parts": tying.parts, "keep_unique": tying.keep_unique}


def root_of(state) -> list[int]:
    """For every block, the root of its group (the block whose weights it uses)."""
    out = []
    for i in range(len(state)):
        while state[i] != i:
            i = state[i]
        out.append(i)
    return out


# ---------------------------------------------------------------------- writing
def write_into(out_dir: str, fill) -> str:
    """Fill a temporary sibling of ``out_dir`` with ``fill(tmp)``, then rename it into place."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ConfigError(f"{out_dir} exists and is not empty; choose a new directory")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        fill(tmp)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty, checked above
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def export_run(run_dir: str, out_dir: str, which: str = "best", fmt: str = "hf") -> str:
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    model, tying, settings = load_run(run_dir, which)

    def fill(tmp: str) -> None:
        if settings.get("model") == "vit":
            _export_image_processor(model, os.path.join(run_dir, "image_processor"), tmp)
        else:
            from megatie.data.hf_tokenizer import export_tokenizer

            special = export_tokenizer(os.path.join(run_dir, "tokenizer"), tmp, int(settings["seq_len"]))
            for key, token_id in special.items():  # generate() needs the tokenizer's own end of text
                setattr(model.config, key, token_id)
        model.config.architectures = [type(model).__name__]
        if fmt == "hf":
            _write_hf(model, tying, tmp)
        else:
            _write_compact(model, tying, tmp)
        _write_card(tmp, fmt, tying, settings, which, _tokenization_note(os.path.join(run_dir, "tokenizer"), settings))

    return write_into(out_dir, fill)


def _export_image_processor(model, processor_dir: str, tmp: str) -> None:
    """The run's image processor next to the model, and its class names in the model's config."""
    names = os.path.join(processor_dir, "classes.json")
    if not os.path.isfile(names):
        raise CheckpointError(f"{os.path.dirname(processor_dir)!r} holds no image_processor/ (image runs save "
                              "theirs there); without it the model's inputs are undefined")
    for entry in os.listdir(processor_dir):
        shutil.copyfile(os.path.join(processor_dir, entry), os.path.join(tmp, entry))
    with open(names, encoding="utf-8") as f:
        classes = json.load(f)["class_names"]
    model.config.id2label = dict(enumerate(classes))
    model.config.label2id = {name: i for i, name in enumerate(classes)}


def _write_hf(model, tying, tmp: str) -> None:
    config = model.config
    config._attn_implementation = None  # let the loading side choose its attention kernel
    setattr(config, TIE_STATE_KEY, plain_tie_state(tying))  # so that fine-tuning can keep the ties
    plain = type(model)(config)  # the same transformers class, every block with weights of its own
    plain.load_state_dict(untied_state_dict(model, tying))
    plain.save_pretrained(tmp, safe_serialization=True)


def _write_compact(model, tying, tmp: str) -> None:
    from safetensors.torch import save_file

    from megatie.checkpoint.store import unique_state_dict

    # Each distinct tensor once, under its first name: a group's tensors at its root (the lowest block),
    # private slots and deltas at their own position, an output layer that is the embedding once.
    save_file(unique_state_dict(model), os.path.join(tmp, "model.safetensors"))
    model.config.to_json_file(os.path.join(tmp, "config.json"))
    with open(os.path.join(tmp, COMPACT_MAP), "w", encoding="utf-8") as f:
        json.dump({"format": "megatie-compact", "version": 2, "state": list(tying.state),
                   "block_path": tying.block_path, **relax_record(tying)}, f, indent=1)


def load_compact(path: str):
    """The compact export's model, its tied blocks sharing their root's tensors."""
    from megatie.models import family_of_class
    from megatie.runtime.trusted_dirs import NO_REMOTE_CODE, refuse_remote_code

    refuse_remote_code(path)
    try:
        with open(os.path.join(path, COMPACT_MAP), encoding="utf-8") as f:
            tie_map = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path!r} is not a compact megatie export: {e}") from None
    import transformers
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from megatie.tying.layers import LayerTying

    try:
        config = AutoConfig.from_pretrained(path, **NO_REMOTE_CODE)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path!r} is not a compact megatie export: {str(e).splitlines()[0]}") from None
    if not isinstance(tie_map, dict) or not {"block_path", "state"} <= set(tie_map):
        raise CheckpointError(f"{path!r} is not a compact megatie export: its {COMPACT_MAP} lacks the tie map")
    if config.architectures:  # the class the run trained: one of ours, by name, never any class in transformers
        model = getattr(transformers, family_of_class(config.architectures[0]).hf_class)(config)
    else:  # exports from before other families: causal LMs
        model = transformers.AutoModelForCausalLM.from_config(config)
    tying = LayerTying(model, "shared", tie_map["block_path"], relax=tie_map.get("relax"),
                       parts=tie_map.get("parts", "all"), keep_unique=tie_map.get("keep_unique", "none"))
    tying.initialize(tie_map["state"])
    load_model_tensors(model, load_file(os.path.join(path, "model.safetensors")))
    model.megatie_tying = tying  # what untied_state_dict and fine-tuning need to read it
    return model.eval()


def export_sizes(tying) -> tuple[int, int]:
    """``(stored, materialised)`` parameter counts: the compact export's distinct tensors, the hf export's."""
    from megatie.tying.layers import unique_parameters

    return sum(p.numel() for p in unique_parameters(tying.model)), tying.untied_parameter_count()


# The transformers auto class that loads each family's export, and how the card names the model.
_CARDS = {"gpt2": ("AutoModelForCausalLM", "GPT-2"), "llama": ("AutoModelForCausalLM", "A Llama-style decoder"),
          "bert": ("AutoModelForMaskedLM", "A BERT encoder (masked LM)"),
          "vit": ("AutoModelForImageClassification", "A Vision Transformer (image classifier)")}


def _tokenization_note(tokenizer_dir: str, settings: dict) -> str:
    """How the export's tokenizer turns a document into the ids the model trained on (the card's words)."""
    if settings.get("model") == "vit":
        return ""
    from megatie.data.tokenizers import read_tokenization

    if read_tokenization(tokenizer_dir) == "text":
        return (f"- Tokenization: the text as written. `tokenizer(document)` gives the ids the model trained on, "
                f"line breaks included\n  (a token of their own); the end-of-text token marks the end of a document, "
                f"and inputs are at most {settings['seq_len']} tokens.\n")
    return ("- Tokenization (a run made before line breaks were tokens): the model trained on each stripped, "
            "non-empty line\n  encoded alone and followed by the end-of-text token (SentencePiece) or the newline "
            "token; encode a document\n  line by line that way to see what it saw, and expect generation to stop "
            "at a line end.\n")


def _write_card(tmp: str, fmt: str, tying, settings: dict, which: str, tokenization: str = "") -> None:
    state = list(tying.state)
    independent = num_independent(state)
    family = settings.get("model", "gpt2")
    auto, title = _CARDS.get(family, _CARDS["gpt2"])
    inputs = "AutoImageProcessor" if family == "vit" else "AutoTokenizer"
    record = relax_record(tying)
    relaxed = (f"`{record['relax']}` (per position), tied parts `{record['parts']}`, kept out of tying "
               f"`{record['keep_unique']}`; the map below covers blocks {tying.offset}..{tying.offset + len(state) - 1}")
    stored, materialised = export_sizes(tying)
    load = (f"from transformers import {auto}, {inputs}\nmodel = {auto}.from_pretrained(PATH)\n"
            f"{'processor' if family == 'vit' else 'tokenizer'} = {inputs}.from_pretrained(PATH)"
            if fmt == "hf" else "from megatie.tools.export import load_compact\nmodel = load_compact(PATH)")
    shape = (f"{settings['image_size']}x{settings['image_size']} images in {settings['patch_size']}-pixel patches, "
             f"{settings['num_classes']} classes" if family == "vit" else
             f"context {settings['seq_len']},\n  vocabulary {settings['vocab_size']} ({settings['tokenizer']} tokenizer)")
    card = f"""---
library_name: transformers
tags: [{family}, megatie, layer-tying]
---
# {title} trained from scratch with dynamic layer tying (megatie)

- Shape: {settings['n_layer']} blocks, d={settings['n_embd']}, {settings['n_head']} heads, {shape}.
- Tie map at this checkpoint (`{which}`): block i uses the weights of block `root[i]`, `root` =
  `{root_of(state)}` (state `{state}`):
  {independent} independent block(s) of {len(state)}.
{tokenization}- Ties relaxed: {relaxed}.
- Sizes: {stored:,} parameters stored by the compact export (roots, deltas, per-position tensors),
  {materialised:,} in the standard model (every block materialised).
- Trained with tie policy `{settings['tie_policy']}` (mode `{settings['tie_mode']}`, a decision every
  {settings['tie_every']} steps), {settings['max_steps']} steps, lr {settings['lr']}, micro-batch {settings['batch_size']}.
- Format: `{fmt}` - {"every block has weights of its own (tied blocks hold copies of their root's)" if fmt == "hf"
                      else "only the independent blocks are stored; load_compact re-ties the others"}.

```python
{load}
```
"""
    with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
        f.write(card)
