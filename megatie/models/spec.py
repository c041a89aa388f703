"""What megatie needs to know about a model family, and the shared way of building one.

Importing a family module is cheap (transformers loads inside its builder), so the launchers can read a
family's presets while validating flags, before any heavy import.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

OBJECTIVES = ("causal", "masked", "image")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    # build(n_layer, n_embd, n_head, seq_len, outputs, dropout, seed=..., device=..., **extra) -> a
    # transformers model; ``outputs`` is the vocabulary (language models) or the number of classes.
    build: Callable[..., Any]
    block_path: str           # where the stack of identical blocks lives (what LayerTying ties)
    hf_class: str             # the transformers class a run of this family leaves behind
    objective: str = "causal"  # "causal" (next token), "masked" (masked tokens) or "image" (one label)
    # Per-preset settings that differ from the shared presets (megatie.presets.PRESETS) for this family.
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    extra_settings: tuple[str, ...] = ()  # further TrainConfig fields the builder takes by name

    @property
    def outputs_setting(self) -> str:
        return "num_classes" if self.objective == "image" else "vocab_size"

    def build_for(self, settings: Mapping[str, Any], seed: int | None = None, device="cpu", dropout=None):
        """The model a run with these settings (a TrainConfig's fields, or config.json) trains."""
        extra = {k: settings[k] for k in self.extra_settings}
        return self.build(settings["n_layer"], settings["n_embd"], settings["n_head"], settings["seq_len"],
                          settings[self.outputs_setting], settings.get("dropout", 0.0) if dropout is None else dropout,
                          seed=seed, device=device, **extra)


def quiet_build(cls, config, seed: int | None, device, loss_type: str | None = "ForCausalLM"):
    """``cls(config)`` initialised from ``seed`` without touching the global RNG, directly on ``device``
    (a 1.5B-parameter model initialised on the host first would spend tens of seconds in CPU random
    number generation before it ever reached the GPU), without transformers' per-build warnings."""
    import torch
    from transformers.utils import logging as hf_logging

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
        if loss_type is not None:
            model.loss_type = loss_type  # names the loss explicitly (otherwise a warning per run)
        return model
    finally:
        hf_logging.set_verbosity(verbosity)
