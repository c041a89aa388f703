"""A run's settings: plain data in sections, resolved once, never changed afterwards.

``TrainConfig`` has one frozen section per concern - ``run``, ``model``, ``data``, ``optim``, ``tying``,
``agent``, ``engine`` - as the flags fill them (``megatie.tools.train_cli``). The launcher flags are the
one source of truth for model size, micro-batch and learning rate; DeepSpeed JSON files hold engine
settings only. Outside the sections every setting also has one *flat* name, its flag's (``--n-layer`` is
``n_layer``, ``--agent-lr`` is ``agent_lr``, the family is ``model``): checkpoints, ``config.json`` and
``--allow-changed`` speak those names.

``resolved()`` fills what was left unset (presets, the family's adjustments, derived defaults, the
DeepSpeed file's content) and validates, once. What the run learns later - the vocabulary a tokenizer
ended with, an image set's classes and shape, the blocks a policy trains - is a ``RunFacts`` record beside
the config, never written back into it; ``config.json`` holds both.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from types import SimpleNamespace

from megatie.errors import CheckpointError, ConfigError
from megatie.models import MODEL_FAMILIES
from megatie.presets import PRESETS
from megatie.tying.options import (
    DEFAULT_POLICY,
    GROW_LAYOUTS,
    KEEP_UNIQUE,
    MOVES,
    POLICIES,
    REWARD_NORMS,
    REWARDS,
    TIE_MODES,
    TIE_PARTS,
    AgentConfig,
    parse_relax,
)

LR_SCHEDULES = ("cosine", "constant")
# The vocabulary padding a run gets unless told, on every device (a run resumes and exports the same
# on a CPU and a GPU): tensor-core friendly shapes for the embedding and the LM head (GPT-2's 50257
# becomes nanoGPT's 50304). The SentencePiece sizes the presets, benchmarks and tests use (512, 4096,
# 8192) are multiples already: their models, losses and parameter counts do not change.
DEFAULT_PAD_VOCAB_TO = 128
DEFAULT_TIE_EVERY = 15  # steps between decisions (the paper's k) when --tie-every is not given
MAX_VOCAB = 1 << 22  # four million pieces: beyond every tokenizer in use, and an embedding of GBs at any width
# Bounds, inclusive, of the numbers validate() leaves to _validate_numbers (every float must also be finite).
BOUNDS = {"seed": (0, 2**31 - 1), "eval_batches": (1, None), "warmup_steps": (0, None), "grad_clip": (0, None),
          "weight_decay": (0, None), "min_lr_ratio": (0, 1), "pad_vocab_to": (1, 1 << 16),
          "gamma": (0, 1), "agent_lr": (0, None), "eps_start": (0, 1), "eps_decay": (0, 1), "eps_min": (0, 1),
          "agent_hidden": (1, None), "grad_accum": (1, None), "threads": (1, 4096)}


@dataclass(frozen=True)
class RunSettings:
    out_dir: str | None = None  # runs/<family>: each launcher's runs apart
    preset: str = "tiny"
    max_steps: int | None = None
    seed: int = 1234
    resume: str | None = None
    allow_changed: list[str] = field(default_factory=list)  # settings a resumed run may change
    log_every: int = 10
    eval_every: int | None = None
    eval_batches: int | None = 50
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    save_checkpoints: bool = True  # False: no step/best checkpoints (benchmarks)
    progress: bool = True
    threads: int | None = None  # CPU threads of each process; unset: the usable cores shared among local ranks


@dataclass(frozen=True)
class ModelSettings:
    # The family is the launcher's (train_gpt2.py, train_llama.py, train_bert.py, train_vit.py); the shape the
    # preset's (with the family's own adjustments, megatie.models.<family>) or the flags'.
    family: str = "gpt2"
    n_layer: int | None = None
    n_embd: int | None = None
    n_head: int | None = None
    seq_len: int | None = None
    dropout: float = 0.0
    vocab_size: int | None = None  # of the tokenizer trained on the corpus (the data may decide otherwise)
    # The embedding and LM head get rows up to a multiple of this (megatie.models.vocab); the padded ids are
    # never targets, their logits are masked, exports have the tokenizer's vocabulary. 1: none.
    pad_vocab_to: int | None = None
    image_size: int | None = None  # ViT; default: the images' own size (digits: 8), 32 for folders
    patch_size: int | None = None  # default: image_size / 4, so 16 patches per image


@dataclass(frozen=True)
class DataSettings:
    train_files: list[str] = field(default_factory=list)
    valid_files: list[str] = field(default_factory=list)
    dataset: str | None = None
    dataset_dir: str | None = None
    data_dir: str | None = None
    tokenizer: str = "sentencepiece"
    mask_prob: float = 0.15  # masked LM (BERT): the share of tokens chosen for prediction
    image_dir: str | None = None  # ViT: a class-per-directory folder; the digits scikit-learn ships if none
    cache_dir: str = "~/.cache/megatie"


@dataclass(frozen=True)
class OptimSettings:
    batch_size: int | None = None  # micro-batch per rank
    grad_accum: int = 1
    lr: float | None = None
    min_lr_ratio: float = 0.1
    lr_schedule: str = "cosine"
    warmup_steps: int | None = None
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8


@dataclass(frozen=True)
class TyingSettings:
    tie_policy: str = DEFAULT_POLICY
    tie_every: int | None = None  # DEFAULT_TIE_EVERY unless given; a given one must leave a step to decide at
    tie_mode: str = "shared"
    reward: str = "neg-ppl"
    reward_batch_size: int | None = None
    reward_delay: bool = False
    reference_run: str | None = None
    static_state: list[int] | None = None
    vanilla_layers: int | None = None
    # split: the most trainable parameters it may reach, as a fraction of conventional's. Unset: a third,
    # and never fewer than two independent blocks (megatie.tying.policies.roots_within_budget).
    param_budget: float | None = None
    grow_start: float = 0.5
    grow_final: int | None = None
    grow_layout: str = "contiguous"
    # What a tie shares (megatie.tying.relax): per-position norms/biases and low-rank deltas, which parts
    # of a block are tied, and the blocks kept out of tying altogether.
    tie_relax: str = "none"
    tie_parts: str = "all"
    tie_keep_unique: str = "none"


@dataclass(frozen=True)
class EngineSettings:
    # DeepSpeed when a config is given (its JSON holds engine settings only), plain torch otherwise. Resolving
    # reads the file once: its validated content and the precision it selects are recorded with the run.
    deepspeed: str | None = None
    deepspeed_config: dict | None = None
    precision: str = "fp32"
    activation_checkpointing: bool = False
    local_rank: int | None = None  # set by the deepspeed launcher
    dist_timeout_s: int = 600  # a collective that waits longer ends the run with an error, never a hang
    peak_tflops: float | None = None  # the GPU's dense peak for MFU; None: looked up from the device name
    tf32: bool = True  # TF32 matmuls for fp32 runs on CUDA (megatie.engines.speed)
    compile: bool = False  # torch.compile of each transformer block


SECTIONS = {"run": RunSettings, "model": ModelSettings, "data": DataSettings, "optim": OptimSettings,
            "tying": TyingSettings, "agent": AgentConfig, "engine": EngineSettings}
# Flat names that differ from the field's: the family is ``model``; the agent's own names get a prefix.
_RENAMED = {("model", "family"): "model", ("agent", "lr"): "agent_lr", ("agent", "moves"): "agent_moves",
            ("agent", "hidden"): "agent_hidden"}
FLAT: dict[str, tuple[str, str]] = {_RENAMED.get((section, f.name), f.name): (section, f.name)
                                    for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


@dataclass(frozen=True)
class RunFacts:
    """What a run learnt after its config was resolved, recorded beside it (``config.json``'s ``resolved``)."""
    n_layer: int                     # the blocks trained (ablation (i) decides its own)
    seq_len: int                     # tokens per example (ViT: patches + [CLS])
    vocab_size: int | None = None    # the tokenizer's (language models)
    tokenization: str | None = None  # how text became ids (``megatie.data.tokenizers``; language models)
    num_classes: int | None = None   # images
    num_channels: int | None = None
    image_size: int | None = None
    patch_size: int | None = None
    tie_relax: str | None = None     # --tie-relax lora:auto as resolved (lora:R), in place of what was asked

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TrainConfig:
    run: RunSettings = field(default_factory=RunSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    tying: TyingSettings = field(default_factory=TyingSettings)
    agent: AgentConfig = field(default_factory=AgentConfig)
    engine: EngineSettings = field(default_factory=EngineSettings)
    # Set by resolved() only: every setting filled and validated. A changed copy (replace) is not resolved.
    is_resolved: bool = field(default=False, compare=False)

    @classmethod
    def from_flat(cls, settings: dict | None = None, **more) -> "TrainConfig":
        """A config from settings by their flat names; unknown names are refused."""
        given = {**(settings or {}), **more}
        unknown = sorted(set(given) - set(FLAT))
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(unknown)}")
        parts: dict[str, dict] = {section: {} for section in SECTIONS}
        for name, value in given.items():
            section, key = FLAT[name]
            parts[section][key] = value
        return cls(**{section: SECTIONS[section](**values) for section, values in parts.items()})

    def flat(self) -> dict:
        """Every setting by its flat name (the flags'), as config.json and checkpoints record them."""
        return {name: getattr(getattr(self, section), key) for name, (section, key) in FLAT.items()}

    def replace(self, **settings) -> "TrainConfig":
        """A copy with some settings (flat names) changed; this one stays as it is."""
        return TrainConfig.from_flat({**self.flat(), **settings})

    @property
    def uses_deepspeed(self) -> bool:
        return self.engine.deepspeed_config is not None

    def resolved(self) -> "TrainConfig":
        """Fill every setting left unset (preset, family, derived defaults, the DeepSpeed file), then validate."""
        if self.run.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.run.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.model.family not in MODEL_FAMILIES:
            raise ConfigError(f"unknown model family {self.model.family!r}; choose one of {', '.join(MODEL_FAMILIES)}")
        from megatie.models import (
            get_spec,  # plain data: a family module loads transformers only to build
        )

        spec = get_spec(self.model.family)
        values = self.flat()
        for key, value in {**PRESETS[self.run.preset], **spec.presets.get(self.run.preset, {})}.items():
            if values.get(key) is None:
                values[key] = value
        if spec.objective == "image":
            values["vocab_size"] = None  # classes, not tokens: the data decides (RunFacts.num_classes)
        elif values["vocab_size"] is None:
            values["vocab_size"] = 8192
        _fill(values, "pad_vocab_to", DEFAULT_PAD_VOCAB_TO)
        _fill(values, "out_dir", os.path.join("runs", self.model.family))
        _check_decisions(values)
        _fill(values, "tie_every", DEFAULT_TIE_EVERY)
        if isinstance(values["max_steps"], int):
            _fill(values, "warmup_steps", min(100, values["max_steps"] // 10))
            _fill(values, "eval_every", max(1, min(500, values["max_steps"] // 5)))
        _fill(values, "checkpoint_every", values["eval_every"])
        _fill(values, "reward_batch_size", values["batch_size"])
        if values["deepspeed"] is not None or values["deepspeed_config"] is not None:
            from megatie.engines.ds_config import load_ds_config, precision_of

            source = values["deepspeed"] if values["deepspeed"] is not None else values["deepspeed_config"]
            values["deepspeed_config"] = load_ds_config(source)
            values["precision"] = precision_of(values["deepspeed_config"])
        else:
            values["precision"] = "fp32"
        validate(SimpleNamespace(**values))
        return dataclasses.replace(TrainConfig.from_flat(values), is_resolved=True)


def _check_decisions(values: dict) -> None:
    """A --tie-every given that leaves a deciding policy no step to decide at (decisions fall on its
    multiples below --max-steps) would train something else than asked: conventional blocks throughout."""
    every, steps, policy = values["tie_every"], values["max_steps"], values["tie_policy"]
    if every is None or not isinstance(steps, int) or steps < 1 or policy not in POLICIES or policy == "static":
        return
    if values["resume"]:  # the checkpoint's own value (structural), adopted: not the user's choice now
        return
    if POLICIES[policy].ties and isinstance(every, int) and every >= steps:
        raise ConfigError(f"--tie-every {every} is not below --max-steps {steps}: the policy would never decide; "
                          "lower --tie-every or choose --tie-policy conventional")


def _fill(values: dict, key: str, default) -> None:
    if values[key] is None:
        values[key] = default


def validate(s) -> None:
    """Refuse settings (flat names, every one filled) that cannot run, each in one line."""
    if s.model not in MODEL_FAMILIES:
        raise ConfigError(f"unknown model family {s.model!r}; choose one of {', '.join(MODEL_FAMILIES)}")
    positive = ["n_layer", "n_embd", "n_head", "seq_len", "batch_size", "grad_accum", "max_steps",
                "tie_every", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                "reward_batch_size", "pad_vocab_to"]
    for name in positive:
        value = getattr(s, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    _validate_numbers(s)
    if not (0 <= s.adam_beta1 < 1 and 0 <= s.adam_beta2 < 1 and s.adam_eps > 0):
        raise ConfigError(f"Adam settings out of range: betas ({s.adam_beta1}, {s.adam_beta2}) must be in "
                          f"[0, 1) and eps ({s.adam_eps}) positive")
    if s.peak_tflops is not None and not s.peak_tflops > 0:
        raise ConfigError(f"--peak-tflops must be positive, got {s.peak_tflops}")
    if not isinstance(s.dist_timeout_s, int) or s.dist_timeout_s < 1:
        raise ConfigError(f"--dist-timeout-s must be a positive number of seconds, got {s.dist_timeout_s!r}")
    if s.n_embd % s.n_head:
        raise ConfigError(f"--n-embd ({s.n_embd}) must be divisible by --n-head ({s.n_head})")
    if s.vocab_size is not None and s.vocab_size < 16:
        raise ConfigError(f"--vocab-size must be at least 16, got {s.vocab_size}")
    if s.vocab_size is not None and s.vocab_size > MAX_VOCAB:
        raise ConfigError(f"--vocab-size must be at most {MAX_VOCAB}, got {s.vocab_size}")
    if not 0 < s.mask_prob < 1:
        raise ConfigError(f"--mask-prob must be in (0, 1), got {s.mask_prob}")
    _validate_images(s)
    if not s.lr > 0:
        raise ConfigError(f"--lr must be positive, got {s.lr}")
    if not 0 <= s.dropout < 1:
        raise ConfigError(f"--dropout must be in [0, 1), got {s.dropout}")
    if s.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"--lr-schedule must be 'cosine' or 'constant', got {s.lr_schedule!r}")
    if s.tie_policy not in POLICIES:
        raise ConfigError(f"unknown --tie-policy {s.tie_policy!r}; choose one of {', '.join(POLICIES)}")
    if s.tie_mode not in TIE_MODES:
        raise ConfigError(f"unknown --tie-mode {s.tie_mode!r}; choose one of {', '.join(TIE_MODES)}")
    if s.reward not in REWARDS:
        raise ConfigError(f"unknown --reward {s.reward!r}; choose one of {', '.join(REWARDS)}")
    if s.reward_norm not in REWARD_NORMS:
        raise ConfigError(f"unknown --reward-norm {s.reward_norm!r}; choose one of {', '.join(REWARD_NORMS)}")
    if s.target_sync < 0 or s.switch_cost < 0 or s.keep_margin < 0:
        raise ConfigError("--target-sync, --switch-cost and --keep-margin must be non-negative")
    if s.agent_moves not in MOVES:
        raise ConfigError(f"unknown --agent-moves {s.agent_moves!r}; choose one of {', '.join(MOVES)}")
    if not 0 <= s.grow_start < 1:
        raise ConfigError(f"--grow-start must be in [0, 1), got {s.grow_start}")
    if s.grow_layout not in GROW_LAYOUTS:
        raise ConfigError(f"unknown --grow-layout {s.grow_layout!r}; choose contiguous or cyclic")
    info = POLICIES[s.tie_policy]
    if s.param_budget is not None and not info.takes_budget:
        spenders = ", ".join(name for name, p in POLICIES.items() if p.takes_budget)
        raise ConfigError(f"--param-budget is for --tie-policy {spenders} (the other policies fix their structure "
                          "or learn it from a reward)")
    if s.param_budget is not None and not 0 < s.param_budget <= 1:
        raise ConfigError(f"--param-budget must be a fraction in (0, 1], got {s.param_budget}")
    if info.takes_budget and s.tie_mode != "shared":
        default = " (the default)" if s.tie_policy == DEFAULT_POLICY else ""
        raise ConfigError(f"--tie-policy {s.tie_policy}{default} measures each block's gradient: it needs "
                          "--tie-mode shared; with frozen-replica choose another policy (e.g. alternate)")
    _validate_relax(s, info)
    if s.grow_final is not None and not 1 <= s.grow_final <= s.n_layer:
        raise ConfigError(f"--grow-final must be in 1..{s.n_layer}, got {s.grow_final}")
    if info.ties and s.n_layer < 2:
        raise ConfigError("layer tying needs at least 2 blocks (--n-layer >= 2)")
    if s.allow_changed and not s.resume:
        raise ConfigError("--allow-changed names settings a resumed run may change: it needs --resume")
    cache = os.path.expanduser(str(s.cache_dir))
    if os.path.exists(cache) and not os.path.isdir(cache):
        raise ConfigError(f"--cache-dir {s.cache_dir} exists and is not a directory")
    if s.train_files and s.dataset:
        raise ConfigError("give either --train-file or --dataset, not both")
    if s.valid_files and not (s.train_files or s.dataset):
        raise ConfigError("--valid-file needs --train-file (or --dataset) too")
    if s.image_dir and s.model != "vit":
        raise ConfigError("--image-dir is for image models (train_vit.py)")
    if s.dataset_dir and s.dataset != "lm1b":
        raise ConfigError("--dataset-dir reads the One Billion Word Benchmark's own layout: use it with "
                          "--dataset lm1b")


def _validate_numbers(s) -> None:
    for name, value in vars(s).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    for name, (low, high) in BOUNDS.items():
        value = getattr(s, name, None)
        if value is None or isinstance(value, bool):
            continue
        if (low is not None and value < low) or (high is not None and value > high):
            span = f"at least {low}" if high is None else f"in [{low}, {high}]"
            raise ConfigError(f"--{name.replace('_', '-')} must be {span}, got {value}")


def _validate_relax(s, info) -> None:
    try:
        relax = parse_relax(s.tie_relax)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if s.tie_parts not in TIE_PARTS or s.tie_keep_unique not in KEEP_UNIQUE:
        raise ConfigError(f"--tie-parts must be one of {', '.join(TIE_PARTS)} and --tie-keep-unique one of "
                          f"{', '.join(KEEP_UNIQUE)}; got {s.tie_parts!r}, {s.tie_keep_unique!r}")
    if relax.auto and not info.takes_budget:
        raise ConfigError(f"--tie-relax lora:auto lets --param-budget choose the deltas' rank: it needs a policy "
                          f"that spends the budget (split), not {s.tie_policy!r}; give lora:R instead")
    if (relax.any or s.tie_parts != "all") and s.tie_mode != "shared":
        raise ConfigError("--tie-relax and --tie-parts need --tie-mode shared (a frozen replica trains nothing)")
    if (getattr(s, "deepspeed_config", None) or {}).get("zero_optimization", {}).get("stage") == 3:
        from megatie.engines.ds_config import check_stage3_settings

        check_stage3_settings(s)
    kept = {"none": 0, "first": 1, "last": 1, "both": 2}[s.tie_keep_unique]
    if kept and info.ties and s.n_layer - kept < 2:
        raise ConfigError(f"--tie-keep-unique {s.tie_keep_unique} leaves {s.n_layer - kept} block(s) to tie; "
                          "tying needs at least 2")


def _validate_images(s) -> None:
    for name in ("image_size", "patch_size"):
        value = getattr(s, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if s.image_size and s.patch_size and s.image_size % s.patch_size:
        raise ConfigError(f"--patch-size ({s.patch_size}) must divide --image-size ({s.image_size})")
    if s.model == "vit" and (s.train_files or s.valid_files or s.dataset_dir):
        raise ConfigError("train_vit.py reads images: use --image-dir DIR (one directory per class) or "
                          "--dataset NAME (a Hugging Face image dataset), not text files")




# ---------------------------------------------------------------------- a run's settings, as recorded
# Settings that shape the model or its tie structure: a checkpoint only fits a run with the same.
STRUCTURAL = ("model", "n_layer", "n_embd", "n_head", "seq_len", "vocab_size", "pad_vocab_to", "num_classes",
              "image_size", "patch_size", "tie_policy", "tie_mode", "tie_every", "tie_relax", "tie_parts", "tie_keep_unique")
# Settings that do not change what is trained (logging, places, timeouts): free to change on resume.
FREE = frozenset({"out_dir", "threads", "resume", "allow_changed", "progress", "log_every", "eval_every", "eval_batches",
                  "checkpoint_every", "keep_checkpoints", "save_checkpoints", "local_rank", "dist_timeout_s",
                  "peak_tflops", "cache_dir", "deepspeed",
                  # engine settings: the engine checks what must match (ZeRO stage, precision, ranks)
                  "deepspeed_config", "precision",
                  # kernel choices (TF32 matmuls, compiled blocks): the same model, computed faster
                  "tf32", "compile"})
# What a checkpoint written before a setting existed ran with (its settings lack the key).
BEFORE_SETTING = {"pad_vocab_to": 1, "tie_relax": "none", "tie_parts": "all", "tie_keep_unique": "none",
                  "tokenization": "lines"}


def recorded_settings(cfg: TrainConfig, facts: RunFacts) -> dict:
    """The run as it ran, by flat name: every setting, with what the run learnt in place of what it was
    asked (a checkpoint's ``settings``; config.json adds the learnt part again as ``resolved``)."""
    learnt = facts.as_dict()
    for key in ("tokenization", "tie_relax"):  # images have no text; a relax without lora:auto is as asked
        if learnt[key] is None:
            del learnt[key]
    return {**cfg.flat(), **learnt}


def config_record(cfg: TrainConfig, facts: RunFacts) -> dict:
    """What ``config.json`` holds: every setting by its flat name, the sections they belong to, and the
    record of what was learnt after resolving."""
    sections = {name: sorted(n for n, (s, _) in FLAT.items() if s == name) for name in SECTIONS}
    return {**recorded_settings(cfg, facts), "resolved": facts.as_dict(), "sections": sections}


def adopt_unset(cfg: TrainConfig, saved: dict) -> TrainConfig:
    """``cfg`` with every setting the command line left unset (None: sizes, lr, max-steps, warmup...)
    taken from the checkpoint, so that ``--resume auto`` alone continues the run as it was and a
    flag given is a change (which ``check_settings`` then refuses unless allowed)."""
    values, saved = cfg.flat(), {**BEFORE_SETTING, **saved}
    for key, value in values.items():
        if value is None and key not in FREE and saved.get(key) is not None:
            values[key] = saved[key]
    return TrainConfig.from_flat(values)


def check_settings(saved: dict, current: dict, allowed: list[str]) -> dict[str, list]:
    """``{setting: [checkpoint's, this run's]}`` for every allowed change; raise for any other."""
    saved = {**BEFORE_SETTING, **saved}
    unknown = sorted(set(allowed) - set(current))
    if unknown:
        raise ConfigError(f"--allow-changed names unknown setting(s) {', '.join(unknown)}")
    changed = {k: [saved[k], current[k]] for k in current
               if k in saved and k not in FREE and _normal(saved[k]) != _normal(current[k])}
    for key in STRUCTURAL:
        if key in changed:
            old, new = changed[key]
            raise CheckpointError(f"checkpoint was made with {key}={old!r}, this run has {new!r}; the model and "
                                  "its tie structure cannot change on resume")
    refused = [k for k in changed if k not in allowed]
    if refused:
        listed = ", ".join(f"{k} {changed[k][0]!r} -> {changed[k][1]!r}" for k in refused)
        raise CheckpointError(f"this run changes settings of the checkpoint ({listed}); to resume with the new "
                              f"values pass --allow-changed {','.join(refused)}")
    return changed


def _normal(value):
    """Lists and tuples compare equal (a checkpoint stores lists)."""
    return json.loads(json.dumps(value, default=str))


@dataclass
class FinetuneConfig:
    """``megatie finetune``: a classifier from a trained model, its tie map kept."""

    source: str
    out_dir: str
    train_file: str | None = None
    glue: str | None = None
    valid_file: str | None = None
    held_out: float = 0.2
    text_column: str = "text"
    label_column: str = "label"
    checkpoint: str = "best"
    epochs: int = 3
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 0.01
    max_length: int | None = None
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        if (self.train_file is None) == (self.glue is None):
            raise ConfigError("give exactly one of --train-file and --glue")
        if not 0 < self.held_out < 1:
            raise ConfigError("--held-out must be a fraction in (0, 1)")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if not 0 < self.lr < math.inf:
            raise ConfigError(f"--lr must be a finite positive number, got {self.lr}")
        if not 0 <= self.weight_decay < math.inf:
            raise ConfigError(f"--weight-decay must be a finite number >= 0, got {self.weight_decay}")
        low, high = BOUNDS["seed"]
        if not low <= self.seed <= high:
            raise ConfigError(f"--seed must be in [{low}, {high}], got {self.seed}")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError("--max-length must be at least 2")
