"""Which checkpoint a run resumes from, and what it may change on the way.

- ``--resume auto`` takes the newest checkpoint of the run that verifies (every file's SHA-256);
  damaged newer ones are named and moved aside as ``damaged-step_...`` so that they leave the
  run's timeline but no byte is lost. An explicit path must verify or the run stops.
- A run directory has one timeline: resuming a checkpoint older than the newest one in the
  out-dir is refused (it would overwrite the later checkpoints and metrics); resume into a new
  ``--out-dir`` to branch. On resume, ``metrics.jsonl`` is cut back to the checkpoint's step so
  that no row appears twice after a crash.
- Settings left unset on the command line are the checkpoint's, and settings that change the training
  trajectory must match it unless named in ``--allow-changed`` (``megatie.config.adopt_unset`` and
  ``check_settings``). The model and tie structure never change.
"""

from __future__ import annotations

import json
import os
import sys

from megatie.checkpoint.store import (
    SHARED_FILES,
    Checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_meta,
    set_aside,
    verify_files,
    zero_file,
)
from megatie.errors import CheckpointError, NothingLeftToTrain
from megatie.runtime.atomic import write_lines_atomic


def _problem_for_rank(path: str, rank: int) -> str | None:
    """Rank 0 verifies the files every rank reads, each rank its own ZeRO slice: the checkpoint is
    read once in all, in parallel."""
    try:
        meta = read_meta(path)
        names = list(SHARED_FILES) if rank == 0 else []
        listed = any(name.startswith("zero_rank_") for name in meta["files"])
        if listed or os.path.exists(os.path.join(path, zero_file(rank))):
            names.append(zero_file(rank))  # a slice on disk but not in meta.json would be read unverified
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


def open_checkpoint(spec: str, out_dir: str, sync) -> tuple[Checkpoint, list[str]]:
    """The checkpoint to resume from, verified, and the names of the damaged newer ones (``auto``) set
    aside on the way. Collective."""
    path, skipped = choose_checkpoint(spec, out_dir, sync)
    if skipped and sync.is_main:
        set_aside_damaged(skipped, lambda line: print(line, file=sys.stderr, flush=True))
    sync.barrier()
    return load_checkpoint(path), [os.path.basename(p) for p, _ in skipped]


def check_checkpoint_fits(checkpoint: Checkpoint, cfg) -> None:
    """The checkpoint's family, place in the run's timeline and step against this run's (its engine:
    ``megatie.engines.check_checkpoint_engine``)."""
    family = checkpoint.settings.get("model", "gpt2")  # runs from before families were named: GPT-2
    if family != cfg.model.family:
        raise CheckpointError(f"checkpoint was made with model={family!r}, this run has {cfg.model.family!r}; the "
                              f"model and its tie structure cannot change on resume (use train_{family}.py)")
    check_timeline(checkpoint.path, checkpoint.step, cfg.run.out_dir)
    check_max_steps(checkpoint.step, cfg.run.max_steps)


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


def read_step(path: str) -> int:
    return int(read_meta(path)["step"])


def check_max_steps(step: int, max_steps: int) -> None:
    if max_steps <= step:
        raise NothingLeftToTrain(step, max_steps)


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
        write_lines_atomic(path, kept)
    return dropped
