"""DeepSpeed JSON configs: what megatie accepts, and what it adds from the run's own flags.

A DeepSpeed config holds *engine* settings only (ZeRO stage, precision, buckets, offload). Batch
geometry, learning rate, schedule and clipping come from megatie's flags, the one source of truth;
a config that sets them is refused rather than silently overridden. Plain JSON: importing this module
costs nothing, so a bad config fails before torch or DeepSpeed load.
"""

from __future__ import annotations

import json
import os

from megatie.errors import ConfigError

# ds_config keys owned by megatie's flags.
OWNED_KEYS = {
    "train_batch_size": "--batch-size (micro-batch per rank) x --grad-accum x world size",
    "train_micro_batch_size_per_gpu": "--batch-size (micro-batch per rank)",
    "gradient_accumulation_steps": "--grad-accum",
    "optimizer": "--lr / --weight-decay / --adam-beta1/2 / --adam-eps (megatie builds the AdamW the regroup needs)",
    "scheduler": "--lr-schedule / --warmup-steps",
    "gradient_clipping": "--grad-clip",
}

# What stage 3 does not do with ties (checked against the run's flags by ``check_stage3_settings``).
STAGE3_LIMITS = {
    "tie_mode": ("frozen-replica", "a frozen replica reads its root's weights as plain tensors, which stage 3 keeps "
                 "only as partitions; use --tie-mode shared"),
    "compile": (True, "torch.compile of blocks whose parameters ZeRO-3 gathers in module hooks is not supported; "
                "drop --compile"),
}


def _read(source) -> tuple[dict, str]:
    if isinstance(source, dict):
        return json.loads(json.dumps(source)), "the DeepSpeed config"
    where = f"DeepSpeed config {source!r}"
    if not os.path.isfile(str(source)):
        raise ConfigError(f"{where} does not exist")
    try:
        with open(source, encoding="utf-8") as f:
            return json.load(f), where
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{where} is not valid JSON: {e}") from None
    except RecursionError:
        raise ConfigError(f"{where} nests deeper than any DeepSpeed config does") from None


def load_ds_config(source) -> dict:
    """Read and check a DeepSpeed config (path or dict); raise ``ConfigError`` on anything wrong."""
    user, where = _read(source)
    if not isinstance(user, dict):
        raise ConfigError(f"{where} must be a JSON object")
    for key, flag in OWNED_KEYS.items():
        if key in user:
            raise ConfigError(f"{where} sets {key!r}; megatie takes it from {flag} - remove it from the config")
    if "activation_checkpointing" in user:
        raise ConfigError(f"{where} has an 'activation_checkpointing' section; use --activation-checkpointing "
                          "(non-reentrant, works with tied blocks) instead")
    zero = user.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{where}: 'zero_optimization' must be an object")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{where}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    if "offload_param" in zero:
        raise ConfigError(f"{where}: offload_param (parameters on the host) is not supported with ties; use "
                          "offload_optimizer")
    if "offload_optimizer" in zero and stage == 0:
        raise ConfigError(f"{where}: offload_optimizer needs zero_optimization.stage 1, 2 or 3")
    _check_types(user, where)
    enabled = [k for k in ("fp16", "bf16") if isinstance(user.get(k), dict) and user[k].get("enabled")]
    if len(enabled) > 1:
        raise ConfigError(f"{where} enables both fp16 and bf16; choose one")
    return user


# Values DeepSpeed reads with a type in mind; checked here, before DeepSpeed (mid-run, for some) sees them.
# "enabled", anywhere, is a JSON boolean too: DeepSpeed takes the string "false" for on.
BOOLEANS = {"wall_clock_breakdown", "zero_optimization.overlap_comm", "zero_optimization.contiguous_gradients",
            "zero_optimization.reduce_scatter", "zero_optimization.allgather_partitions",
            "zero_optimization.round_robin_gradients", "zero_optimization.offload_optimizer.pin_memory"}
COUNTS = {"steps_per_print", "zero_optimization.reduce_bucket_size", "zero_optimization.allgather_bucket_size",
          "zero_optimization.stage3_prefetch_bucket_size", "zero_optimization.stage3_max_live_parameters",
          "zero_optimization.stage3_max_reuse_distance",
          "fp16.initial_scale_power", "fp16.loss_scale_window", "fp16.hysteresis"}
NUMBERS = {"fp16.loss_scale", "fp16.min_loss_scale", "zero_optimization.stage3_param_persistence_threshold"}


def _check_types(user: dict, where: str) -> None:
    for path, value in _leaves(user):
        if path in BOOLEANS or path.endswith("enabled"):
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: {path} must be true or false (JSON booleans), got {value!r}")
        elif path in COUNTS:
            if not _number(value) or not float("inf") > value >= 1 or value != int(value):
                raise ConfigError(f"{where}: {path} must be a positive whole number, got {value!r}")
        elif path in NUMBERS:
            if not _number(value) or not 0 <= value < float("inf"):
                raise ConfigError(f"{where}: {path} must be a finite number >= 0, got {value!r}")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _leaves(value, path + ".")
        else:
            yield path, value


def check_stage3_settings(settings) -> None:
    """Refuse, in one line, a run's flags (flat names) that ZeRO stage 3 cannot train with ties."""
    for name, (value, why) in STAGE3_LIMITS.items():
        if getattr(settings, name, None) == value:
            raise ConfigError(f"ZeRO stage 3: {why}")


def precision_of(user: dict) -> str:
    for key in ("bf16", "fp16"):
        if isinstance(user.get(key), dict) and user[key].get("enabled"):
            return key
    return "fp32"


def zero_stage_of(user: dict) -> int:
    return int(user.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(user: dict) -> bool:
    """Whether the fp32 masters and Adam state live on the host (``offload_optimizer``)."""
    offload = user.get("zero_optimization", {}).get("offload_optimizer")
    return isinstance(offload, dict) and offload.get("device", "cpu") not in (None, "none")


def engine_config(user: dict, cfg, world_size: int) -> dict:
    """The user's engine settings plus what megatie owns (batch geometry, clipping) and what the
    number of ranks decides (``overlap_comm``)."""
    out = json.loads(json.dumps(user))
    if world_size == 1 and isinstance(out.get("zero_optimization"), dict):
        # overlap_comm runs gradient reductions on a side stream, double-buffered, to hide them behind
        # backward. With one rank there is nothing to hide: what remains is the side stream's
        # synchronisations on every bucket and the second gradient buffer. Off, whatever the config
        # says, so that one GPU and several share one config (ds_configs/README.md).
        out["zero_optimization"]["overlap_comm"] = False
    out["train_micro_batch_size_per_gpu"] = cfg.optim.batch_size
    out["gradient_accumulation_steps"] = cfg.optim.grad_accum
    out["train_batch_size"] = cfg.optim.batch_size * cfg.optim.grad_accum * world_size
    # Always explicit: DeepSpeed's own default clips at 1.0, so --grad-clip 0 must say 0.0 to mean "off".
    out["gradient_clipping"] = float(cfg.optim.grad_clip)
    # megatie passes torch's AdamW (the reference math) also with CPU offload.
    out.setdefault("zero_force_ds_cpu_optimizer", False)
    out.setdefault("zero_allow_untested_optimizer", True)
    out.setdefault("steps_per_print", 10 ** 9)
    return out
