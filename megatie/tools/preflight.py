"""The checks a training run passes before torch, the data and DeepSpeed start: each failure one line,
in seconds, and nothing written (``train_cli.train_main`` makes the run directory only after them)."""

from __future__ import annotations

import glob
import json
import os

from megatie.config import TrainConfig
from megatie.errors import ConfigError, NothingLeftToTrain


def check_out_dir(path: str) -> list[str]:
    """Create the run directory and make sure the run can write there. Done before torch, the data
    and DeepSpeed load, so a mistyped or read-only --out-dir costs a second, not a minute. Every rank
    checks: DeepSpeed checkpoints are written by all ranks. Returns the directories it made, deepest
    first."""
    if not path:
        raise ConfigError("--out-dir must not be empty")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--out-dir {path} exists and is not a directory; choose another path")
    made, probe = [], os.path.abspath(path)
    while not os.path.exists(probe):
        made.append(probe)
        probe = os.path.dirname(probe)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create --out-dir {path}: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"--out-dir {path} is not writable; choose another path")
    return made


def remove_if_empty(made: list[str]) -> None:
    """Remove the directories ``check_out_dir`` made, deepest first, as long as they are empty."""
    for path in made:
        try:
            os.rmdir(path)
        except OSError:
            return


def check_something_left(cfg: TrainConfig, given: set[str]) -> None:
    """``--resume auto`` on a run that already reached its last step, refused from its summary before torch,
    the data and DeepSpeed start (the trainer checks again against the checkpoint it resumes). Only global
    rank 0 says so: one line per job, not one per rank."""
    if cfg.run.resume not in ("auto", "latest"):  # a named checkpoint: the trainer's checks say more
        return
    try:
        with open(os.path.join(cfg.run.out_dir, "summary.json"), encoding="utf-8") as f:
            done = json.load(f).get("steps")
        with open(os.path.join(cfg.run.out_dir, "config.json"), encoding="utf-8") as f:
            recorded = json.load(f)
        planned, family = recorded.get("max_steps"), recorded.get("model", "gpt2")
    except (OSError, ValueError, AttributeError):
        return  # unfinished, or unreadable: the trainer decides from the checkpoint
    if family != cfg.model.family:
        return  # another family's run: the trainer's refusal names the launcher to use
    max_steps = cfg.run.max_steps if "max_steps" in given else planned
    if isinstance(done, int) and isinstance(max_steps, int) and done >= max_steps:
        err = NothingLeftToTrain(done, max_steps)
        err.rank_zero_only = True
        raise err


def check_not_a_run_to_overwrite(cfg: TrainConfig) -> None:
    """Training from scratch into a directory that holds a finished run or checkpoints would overwrite
    them: such a run is continued (--resume) or left alone. A directory whose run died before its first
    checkpoint holds nothing to lose and is trained into again."""
    if cfg.run.resume:
        return
    finished = os.path.isfile(os.path.join(cfg.run.out_dir, "summary.json"))
    held = glob.glob(os.path.join(glob.escape(cfg.run.out_dir), "checkpoints", "step_*", "meta.json"))
    if finished or held:
        what = "a finished run" if finished else f"a run with {len(held)} checkpoint(s)"
        raise ConfigError(f"--out-dir {cfg.run.out_dir} already holds {what}; continue it with --resume auto, or "
                          "choose another --out-dir (nothing there was changed)")


def check_inputs(cfg: TrainConfig) -> None:
    """Paths the run will read: missing ones fail here, before the heavy imports."""
    from megatie.data.sources import resolve_files  # plain Python

    for patterns in (cfg.data.train_files, cfg.data.valid_files):
        if patterns:
            resolve_files(patterns)
    for flag, path in (("--data-dir", cfg.data.data_dir), ("--reference-run", cfg.tying.reference_run),
                       ("--image-dir", cfg.data.image_dir)):
        if path is not None and not os.path.isdir(os.path.expanduser(path)):
            raise ConfigError(f"{flag} {path} is not a directory; check the path")
    if cfg.run.resume not in (None, "auto", "latest") and not os.path.isdir(cfg.run.resume):
        raise ConfigError(f"--resume {cfg.run.resume}: no such checkpoint directory (or use --resume auto)")


class _Hold:
    """A logging filter that keeps the records it stops."""

    def __init__(self, records: list):
        self.records = records

    def filter(self, record) -> bool:
        self.records.append(record)
        return False


def check_precision(cfg: TrainConfig) -> None:
    """Refuse a DeepSpeed config whose fp16/bf16 the accelerator lacks, in one line, before the process
    group, the model and the data exist (DeepSpeed itself only notices in its engine's constructor)."""
    if cfg.engine.precision not in ("fp16", "bf16"):
        return
    import logging

    # Importing DeepSpeed chooses the accelerator and logs "Setting accelerator to CPU ..." when none is
    # named: held back, so a refusal stays one line, and replayed when the run goes on.
    held: list[logging.LogRecord] = []
    ds_logger = logging.getLogger("DeepSpeed")
    hold = _Hold(held)
    ds_logger.addFilter(hold)
    try:
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
    finally:
        ds_logger.removeFilter(hold)
    if accelerator.device_name() != "cpu":
        # The CUDA queries act on the current device: make it this rank's, not everyone's device 0
        # (init_deepspeed_distributed selects the same one).
        accelerator.set_device(int(os.environ.get("LOCAL_RANK", cfg.engine.local_rank or 0)))
    supported = {"fp16": accelerator.is_fp16_supported, "bf16": accelerator.is_bf16_supported}
    if supported[cfg.engine.precision]():  # the CPU accelerator answers None rather than False for fp16
        for record in held:
            ds_logger.handle(record)
        return
    source = cfg.engine.deepspeed if cfg.engine.deepspeed is not None else "the DeepSpeed config"
    other = "bf16" if cfg.engine.precision == "fp16" else "fp16"
    also = f" or ds_configs/zero2_{other}.json ({other})" if supported[other]() else ""
    raise ConfigError(f"{source} asks for {cfg.engine.precision}, which DeepSpeed's {accelerator.device_name()} "
                      f"accelerator does not support on this machine; use ds_configs/zero2.json (fp32){also}")
