"""Which checkpoint a run resumes from, and what it may change on the way.

- ``--resume auto`` takes the newest checkpoint of the run that verifies (every file's SHA-256);
  damaged newer ones are named and moved aside as ``damaged-step_...`` so that they leave the
  run's timeline but no byte is lost. An explicit path must verify or the run stops.
- A run directory has one timeline: resuming a checkpoint older than the newest one in the
  out-dir is refused (it would overwrite the later checkpoints and metrics); resume into a new
  ``--out-dir`` to branch. On resume, ``metrics.jsonl`` is cut back to the checkpoint's step so
  that no row appears twice after a crash.
- Settings left unset on the command line are the checkpoint's. Settings that change the training
  trajectory must match the checkpoint's, unless named in ``--allow-changed``; the overrides are
  logged. The model and tie structure never change.
"""

from __future__ import annotations

import dataclasses
import json
import os

from megatie.checkpoint.store import (
    SHARED_FILES,
    list_checkpoints,
    read_meta,
    set_aside,
    verify_files,
    zero_file,
)
from megatie.config import BEFORE_SETTING, FREE, STRUCTURAL
from megatie.errors import CheckpointError, ConfigError


def _problem_for_rank(path: str, rank: int) -> str | None:
    """Rank 0 verifies the files every rank reads, each rank its own ZeRO slice: the checkpoint is
    read once in all, in parallel."""
    try:
        meta = read_meta(path)
        names = list(SHARED_FILES) if rank == 0 else []
        if zero_file(rank) in meta["files"]:
            names.append(zero_file(rank))
        verify_files(path, names)
    except CheckpointError as e:
        return str(e)
    return None


def choose_checkpoint(spec: str, out_dir: str, sync) -> tuple[str, list[tuple[str, str]]]:
    """``(path, skipped)``: the checkpoint to resume from, and the damaged ones passed over (auto).
    Collective: every rank takes part in every verification and all reach the same choice."""
    explicit = spec not in ("auto", "latest")
    root = os.path.join(out_dir, "checkpoints")
    candidates = [spec] if explicit else list(reversed(list_checkpoints(root)))
    if not candidates:
        raise CheckpointError(f"--resume {spec}: no checkpoint under {root!r}")
    skipped = []
    for path in candidates:
        problems = [p for p in sync.gather(_problem_for_rank(path, sync.rank)) if p]
        if not problems:
            return path, skipped
        if explicit:
            raise CheckpointError(problems[0])
        skipped.append((path, problems[0]))
    raise CheckpointError(f"--resume {spec}: none of the {len(skipped)} checkpoint(s) under {root!r} verifies "
                          f"(newest: {skipped[0][1]})")


def set_aside_damaged(skipped: list[tuple[str, str]], log) -> None:
    for path, problem in skipped:
        moved = set_aside(path)
        log(f"warning: skipped damaged checkpoint {os.path.basename(path)} ({problem}); "
            f"moved to {os.path.basename(moved)}")


def check_timeline(path: str, step: int, out_dir: str) -> None:
    newer = [p for p in list_checkpoints(os.path.join(out_dir, "checkpoints")) if read_step(p) > step]
    if newer:
        raise CheckpointError(
            f"{path!r} is at step {step} but {out_dir!r} already holds {os.path.basename(newer[-1])}: resuming "
            "here would overwrite the run's later checkpoints and metrics; to branch from it, resume into "
            f"a new run directory (--out-dir NEW --resume {path})")


def check_engine(optimizer_state: dict, cfg, world_size: int) -> None:
    """The checkpoint's engine, ZeRO stage, precision and rank count against this run's - checked
    before anything is built, as an optimizer state only loads into the same layout."""
    uses_deepspeed = cfg.uses_deepspeed
    written_by_deepspeed = isinstance(optimizer_state, dict) and "deepspeed" in optimizer_state
    if written_by_deepspeed and uses_deepspeed:
        from megatie.engines.ds_config import zero_stage_of

        info = optimizer_state["deepspeed"]
        for key, mine in (("world_size", world_size), ("stage", zero_stage_of(cfg.deepspeed_config)),
                          ("precision", cfg.precision)):
            if info.get(key) != mine:
                raise CheckpointError(f"the checkpoint was written with {key}={info.get(key)!r}, this run has "
                                      f"{mine!r}; resume with the same DeepSpeed setup")
    if written_by_deepspeed and not uses_deepspeed:
        info = optimizer_state["deepspeed"]
        raise CheckpointError(f"this checkpoint was written by the DeepSpeed engine (ZeRO stage {info.get('stage')}, "
                              f"{info.get('world_size')} rank(s), {info.get('precision')}); resume it under deepspeed "
                              "with --deepspeed CONFIG")
    if uses_deepspeed and not written_by_deepspeed:
        raise CheckpointError("this checkpoint was not written by the DeepSpeed engine; resume it without --deepspeed")


def read_step(path: str) -> int:
    return int(read_meta(path)["step"])


def check_max_steps(step: int, max_steps: int) -> None:
    if max_steps <= step:
        raise ConfigError(f"the checkpoint is at step {step} and --max-steps is {max_steps}: nothing left "
                          f"to train (raise --max-steps and add --allow-changed max_steps)")


def adopt_unset(cfg, saved: dict):
    """``cfg`` with every setting the command line left unset (None: sizes, lr, max-steps, warmup...)
    taken from the checkpoint, so that ``--resume auto`` alone continues the run as it was and a
    flag given is a change (which ``check_settings`` then refuses unless allowed)."""
    values, saved = dataclasses.asdict(cfg), {**BEFORE_SETTING, **saved}
    for key, value in values.items():
        if value is None and key not in FREE and saved.get(key) is not None:
            values[key] = saved[key]
    return type(cfg)(**values)


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


def truncate_metrics(out_dir: str, step: int) -> int:
    """Drop the rows of ``metrics.jsonl`` after ``step`` (written by the run that crashed after the
    checkpoint); returns how many went. Rewritten atomically."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:  # a line cut short by the crash
                dropped += 1
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step:
                dropped += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return dropped
