"""One config dataclass for a training run, its presets (``megatie.presets``) and its validation.

The launcher flags fill ``TrainConfig``; they are the single source of truth for model size,
micro-batch and learning rate (DeepSpeed JSON files hold engine settings only).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# Plain data, so building the parser and validating a config import no torch; PRESETS is re-exported.
from megatie.errors import ConfigError
from megatie.models import MODEL_FAMILIES
from megatie.presets import PRESETS
from megatie.tying.options import (
    GROW_LAYOUTS,
    MOVES,
    POLICIES,
    REWARD_NORMS,
    REWARDS,
    TIE_MODES,
)

LR_SCHEDULES = ("cosine", "constant")


# Settings that shape the model or its tie structure: a checkpoint only fits a run with the same.
STRUCTURAL = ("model", "n_layer", "n_embd", "n_head", "seq_len", "vocab_size", "pad_vocab_to", "num_classes",
              "image_size", "patch_size", "tie_policy", "tie_mode", "tie_every")
# Settings that do not change what is trained (logging, places, timeouts): free to change on resume.
FREE = frozenset({"out_dir", "resume", "allow_changed", "progress", "log_every", "eval_every", "eval_batches",
                  "checkpoint_every", "keep_checkpoints", "save_checkpoints", "local_rank", "dist_timeout_s",
                  "peak_tflops", "cache_dir", "deepspeed",
                  # engine settings: the engine checks what must match (ZeRO stage, precision, ranks)
                  "deepspeed_config", "precision",
                  # kernel choices (TF32 matmuls, compiled blocks): the same model, computed faster
                  "tf32", "compile"})
# What a checkpoint written before a setting existed ran with (its settings lack the key).
BEFORE_SETTING = {"pad_vocab_to": 1}
# The vocabulary padding a run gets unless told, on every device (a run resumes and exports the same
# on a CPU and a GPU): tensor-core friendly shapes for the embedding and the LM head (GPT-2's 50257
# becomes nanoGPT's 50304). The SentencePiece sizes the presets, benchmarks and tests use (512, 4096,
# 8192) are multiples already: their models, losses and parameter counts do not change.
DEFAULT_PAD_VOCAB_TO = 128


@dataclass
class TrainConfig:
    # run
    out_dir: str = "runs/default"
    preset: str = "tiny"
    max_steps: int | None = None
    seed: int = 1234
    resume: str | None = None
    # Settings a resumed run may change from its checkpoint's (megatie.checkpoint.resume says which need it).
    allow_changed: list[str] = field(default_factory=list)
    # model: the family is the launcher's (train_gpt2.py, train_llama.py, train_bert.py, train_vit.py), the
    # shape the preset's (with the family's own adjustments, megatie.models.<family>) or the flags'
    model: str = "gpt2"
    n_layer: int | None = None
    n_embd: int | None = None
    n_head: int | None = None
    seq_len: int | None = None
    dropout: float = 0.0
    # optimisation
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
    # engine: DeepSpeed when a config is given (its JSON holds engine settings only), plain torch otherwise
    deepspeed: str | None = None
    # Derived by resolved(), recorded in config.json: the DeepSpeed config's validated content and the
    # precision it selects ("fp32" without DeepSpeed). Not settings of their own.
    deepspeed_config: dict | None = None
    precision: str = "fp32"
    activation_checkpointing: bool = False
    local_rank: int | None = None  # set by the deepspeed launcher
    dist_timeout_s: int = 600  # a collective that waits longer ends the run with an error, never a hang
    peak_tflops: float | None = None  # the GPU's dense peak for MFU; None: looked up from the device name
    # speed (megatie.engines.speed): TF32 matmuls for fp32 runs on CUDA; each block compiled with torch.compile
    tf32: bool = True
    compile: bool = False
    # tying
    # Chosen by its worst corpus among the policies within a third of conventional's trainable parameters
    # (benchmarks/RESULTS.md §15); the paper's agent is kept as `qlearning`.
    tie_policy: str = "split"
    tie_every: int = 15
    tie_mode: str = "shared"
    reward: str = "neg-ppl"
    reward_batch_size: int | None = None
    reference_run: str | None = None
    static_state: list[int] | None = None
    vanilla_layers: int | None = None
    agent_lr: float = 1e-3
    gamma: float = 0.99
    eps_decay: float = 0.95
    eps_min: float = 0.1
    reward_norm: str = "none"
    target_sync: int = 0
    switch_cost: float = 0.0
    agent_moves: str = "vector"
    keep_margin: float = 0.0
    reward_delay: bool = False
    grow_start: float = 0.5
    grow_final: int | None = None
    grow_layout: str = "contiguous"
    # split: the most trainable parameters it may reach, as a fraction of conventional's. Unset: a third,
    # and never fewer than two independent blocks (see megatie.tying.policies.roots_within_budget).
    param_budget: float | None = None
    # data
    train_files: list[str] = field(default_factory=list)
    valid_files: list[str] = field(default_factory=list)
    dataset: str | None = None
    dataset_dir: str | None = None
    data_dir: str | None = None
    tokenizer: str = "sentencepiece"
    vocab_size: int | None = None
    # The model's embedding and LM head get rows up to a multiple of this (megatie.models.vocab); the padded
    # ids are never targets, their logits are masked, exports have the tokenizer's vocabulary. 1: none.
    pad_vocab_to: int | None = None
    mask_prob: float = 0.15  # masked LM (BERT): the share of tokens chosen for prediction
    # images (ViT): a class-per-directory folder, or the digits scikit-learn ships when none is given
    image_dir: str | None = None
    image_size: int | None = None  # default: the images' own size (digits: 8), 32 for folders
    patch_size: int | None = None  # default: image_size / 4, so 16 patches per image
    # Derived from the data, recorded in config.json: classes and channels of the images.
    num_classes: int | None = None
    num_channels: int | None = None
    cache_dir: str = "~/.cache/megatie"
    # logging and evaluation
    log_every: int = 10
    eval_every: int | None = None
    eval_batches: int | None = 50
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    save_checkpoints: bool = True  # False: no step/best checkpoints (benchmarks)
    progress: bool = True

    def resolved(self) -> "TrainConfig":
        """Fill preset defaults for every field left unset, then validate."""
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        values = dataclasses.asdict(self)
        from megatie.models import (
            get_spec,  # plain data: a family module loads transformers only to build
        )

        spec = get_spec(self.model)
        for key, value in {**PRESETS[self.preset], **spec.presets.get(self.preset, {})}.items():
            if values.get(key) is None:
                values[key] = value
        if spec.objective == "image":
            values["vocab_size"] = None  # classes, not tokens: the data decides (num_classes)
        elif values["vocab_size"] is None:
            values["vocab_size"] = 8192
        if values["pad_vocab_to"] is None:
            values["pad_vocab_to"] = DEFAULT_PAD_VOCAB_TO
        cfg = TrainConfig(**values)
        if cfg.warmup_steps is None:
            cfg.warmup_steps = min(100, cfg.max_steps // 10)
        if cfg.eval_every is None:
            cfg.eval_every = max(1, min(500, cfg.max_steps // 5))
        if cfg.checkpoint_every is None:
            cfg.checkpoint_every = cfg.eval_every
        if cfg.reward_batch_size is None:
            cfg.reward_batch_size = cfg.batch_size
        if cfg.deepspeed is not None or cfg.deepspeed_config is not None:
            from megatie.engines.ds_config import load_ds_config, precision_of

            cfg.deepspeed_config = load_ds_config(cfg.deepspeed if cfg.deepspeed is not None else cfg.deepspeed_config)
            cfg.precision = precision_of(cfg.deepspeed_config)
        else:
            cfg.precision = "fp32"
        cfg.validate()
        return cfg

    @property
    def uses_deepspeed(self) -> bool:
        return self.deepspeed_config is not None

    def validate(self) -> None:
        if self.model not in MODEL_FAMILIES:
            raise ConfigError(f"unknown model family {self.model!r}; choose one of {', '.join(MODEL_FAMILIES)}")
        positive = ["n_layer", "n_embd", "n_head", "seq_len", "batch_size", "grad_accum", "max_steps",
                    "tie_every", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                    "reward_batch_size", "pad_vocab_to"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1 and self.adam_eps > 0):
            raise ConfigError(f"Adam settings out of range: betas ({self.adam_beta1}, {self.adam_beta2}) must be in "
                              f"[0, 1) and eps ({self.adam_eps}) positive")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ConfigError(f"--peak-tflops must be positive, got {self.peak_tflops}")
        if not isinstance(self.dist_timeout_s, int) or self.dist_timeout_s < 1:
            raise ConfigError(f"--dist-timeout-s must be a positive number of seconds, got {self.dist_timeout_s!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"--n-embd ({self.n_embd}) must be divisible by --n-head ({self.n_head})")
        if self.vocab_size is not None and self.vocab_size < 16:
            raise ConfigError(f"--vocab-size must be at least 16, got {self.vocab_size}")
        if not 0 < self.mask_prob < 1:
            raise ConfigError(f"--mask-prob must be in (0, 1), got {self.mask_prob}")
        self._validate_images()
        if not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"--lr-schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        if self.tie_policy not in POLICIES:
            raise ConfigError(f"unknown --tie-policy {self.tie_policy!r}; choose one of {', '.join(POLICIES)}")
        if self.tie_mode not in TIE_MODES:
            raise ConfigError(f"unknown --tie-mode {self.tie_mode!r}; choose one of {', '.join(TIE_MODES)}")
        if self.reward not in REWARDS:
            raise ConfigError(f"unknown --reward {self.reward!r}; choose one of {', '.join(REWARDS)}")
        if self.reward_norm not in REWARD_NORMS:
            raise ConfigError(f"unknown --reward-norm {self.reward_norm!r}; choose one of {', '.join(REWARD_NORMS)}")
        if self.target_sync < 0 or self.switch_cost < 0 or self.keep_margin < 0:
            raise ConfigError("--target-sync, --switch-cost and --keep-margin must be non-negative")
        if self.agent_moves not in MOVES:
            raise ConfigError(f"unknown --agent-moves {self.agent_moves!r}; choose one of {', '.join(MOVES)}")
        if not 0 <= self.grow_start < 1:
            raise ConfigError(f"--grow-start must be in [0, 1), got {self.grow_start}")
        if self.grow_layout not in GROW_LAYOUTS:
            raise ConfigError(f"unknown --grow-layout {self.grow_layout!r}; choose contiguous or cyclic")
        if self.param_budget is not None and self.tie_policy != "split":
            raise ConfigError("--param-budget is for --tie-policy split (the other policies fix their structure "
                              "or learn it from a reward)")
        if self.param_budget is not None and not 0 < self.param_budget <= 1:
            raise ConfigError(f"--param-budget must be a fraction in (0, 1], got {self.param_budget}")
        if self.tie_policy == "split" and self.tie_mode != "shared":
            raise ConfigError("--tie-policy split (the default) measures each block's gradient: it needs "
                              "--tie-mode shared; with frozen-replica choose another policy (e.g. alternate)")
        if self.grow_final is not None and not 1 <= self.grow_final <= self.n_layer:
            raise ConfigError(f"--grow-final must be in 1..{self.n_layer}, got {self.grow_final}")
        if self.tie_policy not in ("conventional", "vanilla") and self.n_layer < 2:
            raise ConfigError("layer tying needs at least 2 blocks (--n-layer >= 2)")
        if self.train_files and self.dataset:
            raise ConfigError("give either --train-file or --dataset, not both")
        if self.valid_files and not (self.train_files or self.dataset):
            raise ConfigError("--valid-file needs --train-file (or --dataset) too")
        if self.image_dir and self.model != "vit":
            raise ConfigError("--image-dir is for image models (train_vit.py)")
        if self.dataset_dir and self.dataset != "lm1b":
            raise ConfigError("--dataset-dir reads the One Billion Word Benchmark's own layout: use it with "
                              "--dataset lm1b")

    def _validate_images(self) -> None:
        for name in ("image_size", "patch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.image_size and self.patch_size and self.image_size % self.patch_size:
            raise ConfigError(f"--patch-size ({self.patch_size}) must divide --image-size ({self.image_size})")
        if self.model == "vit" and (self.train_files or self.valid_files or self.dataset_dir):
            raise ConfigError("train_vit.py reads images: use --image-dir DIR (one directory per class) or "
                              "--dataset NAME (a Hugging Face image dataset), not text files")


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
        if not self.lr > 0:
            raise ConfigError("--lr must be positive")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError("--max-length must be at least 2")
