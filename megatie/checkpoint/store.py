"""Atomic, verified checkpoints that load without running code.

A checkpoint is a directory ``step_XXXXXXXX/`` (or ``best/``) with
- ``model.safetensors``: every distinct tensor once (a tied group is stored at its root's name);
- ``optimizer.pt`` and ``trainer.pt``: optimizer/scheduler state and trainer state (tie structure,
  agent, history, RNG, data position) - plain tensors, numbers and strings, loaded with
  ``torch.load(weights_only=True)``, whose unpickler refuses every class and function it does not
  know, so a planted payload is an error, never code that runs;
- with DeepSpeed, ``zero_rank_XXXXX.safetensors``: each rank's slice of the fp32 masters and Adam
  moments (DeepSpeed's own checkpoint files are unpickled with ``weights_only=False``, so megatie
  does not write or read them);
- ``meta.json``, written last: format, step, engine, and the size and SHA-256 of every file.

Every file is checked against its SHA-256 before anything is read, so damaged bytes are refused,
not trained on. A checkpoint is written into a temporary directory and renamed into place: a crash
leaves the old checkpoint set or the new one, never a directory that looks complete but is not.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from megatie.errors import CheckpointError
from megatie.runtime.atomic import fsync_dir, replace_dir, write_json_atomic

FORMAT_VERSION = 3  # 3: SHA-256 of every file; DeepSpeed state in safetensors; the step in meta.json
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
SHARED_FILES = ("model.safetensors", "optimizer.pt", "trainer.pt")  # read by every rank
_HASH_CHUNK = 1 << 24


def zero_file(rank: int) -> str:
    return f"zero_rank_{rank:05d}.safetensors"


def unique_state_dict(model: nn.Module, read=None) -> dict[str, torch.Tensor]:
    """The model's tensors, each distinct tensor once under the first name it has. ``read(tensor)``: how
    each is taken (default: detached, contiguous, on the host); a ``None`` it returns is left out."""
    out, seen = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        value = tensor.detach().contiguous().cpu() if read is None else read(tensor)
        if value is not None:
            out[name] = value
    return out


def load_model_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved tensors into a model that already has the checkpoint's tie structure."""
    expected = unique_state_dict(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            "checkpoint does not match the model: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    live = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, value in tensors.items():
            target = live[name]
            if target.shape != value.shape:
                raise CheckpointError(f"checkpoint tensor {name} has shape {tuple(value.shape)}, "
                                      f"the model expects {tuple(target.shape)}")
            target.copy_(value)


# ---------------------------------------------------------------------- writing
def file_record(path: str) -> dict:
    """Size and SHA-256 of a file, after making it durable."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def save_checkpoint(root: str, name: str, step: int, model: nn.Module, optimizer_state: dict,
                    trainer_state: dict) -> str:
    """Write checkpoint ``root/name`` of the single-process engine atomically."""
    tmp = start_checkpoint_dir(root, name)
    write_shared_files(tmp, model, optimizer_state, trainer_state)
    seal_checkpoint_dir(tmp, step=step, engine="torch", world_size=1)
    final = os.path.join(root, name)
    replace_dir(tmp, final)
    return final


def start_checkpoint_dir(root: str, name: str) -> str:
    tmp = os.path.join(root, f".{name}.tmp")
    os.makedirs(root, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def write_shared_files(tmp: str, model: nn.Module, optimizer_state: dict, trainer_state: dict,
                       weights: dict[str, torch.Tensor] | None = None) -> None:
    """``weights``: the model's tensors where the model does not hold them whole (ZeRO-3)."""
    try:
        save_file(unique_state_dict(model) if weights is None else weights, os.path.join(tmp, "model.safetensors"))
        torch.save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
        torch.save(trainer_state, os.path.join(tmp, "trainer.pt"))
    except (OSError, RuntimeError, SafetensorError) as e:
        # torch reports a failed write (a full disk, a quota, a file-size limit) as a RuntimeError
        if isinstance(e, RuntimeError) and "write" not in str(e).lower():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {os.path.basename(tmp)[1:-4]!r} under "
                              f"{os.path.dirname(tmp)} ({str(e).splitlines()[0][:120] or type(e).__name__}); "
                              "is the disk full? The checkpoints written before it are intact") from None


def seal_checkpoint_dir(tmp: str, recorded: dict[str, dict] | None = None, **meta) -> None:
    """List every file under ``tmp`` with its size and SHA-256 in ``meta.json``, written last, so a
    directory with a meta.json is complete. ``recorded``: records other ranks already computed."""
    files = dict(recorded or {})
    for fname in sorted(os.listdir(tmp)):
        if fname not in files and os.path.isfile(os.path.join(tmp, fname)):
            files[fname] = file_record(os.path.join(tmp, fname))
    write_json_atomic(os.path.join(tmp, "meta.json"), {"format": FORMAT_VERSION, **meta, "files": files})
    fsync_dir(tmp)


# ---------------------------------------------------------------------- reading
def read_meta(path: str) -> dict:
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict):
        if os.path.isdir(os.path.join(path, "checkpoints")):  # a run directory, named where a checkpoint goes
            raise CheckpointError(f"{path!r} is a run directory, not a checkpoint: continue it with --out-dir "
                                  f"{path} --resume auto, or name one of {os.path.join(path, 'checkpoints')}/step_*")
        raise CheckpointError(f"checkpoint {path!r} has no readable meta.json; it is incomplete or corrupt")
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path!r} has format {meta.get('format')}, this megatie reads "
                              f"format {FORMAT_VERSION}")
    if not isinstance(meta.get("files"), dict) or not isinstance(meta.get("step"), int):
        raise CheckpointError(f"checkpoint {path!r} has no readable meta.json; it is incomplete or corrupt")
    return meta


def verify_files(path: str, names: list[str] | None = None) -> dict:
    """Check the size and SHA-256 of ``names`` (default: every listed file); returns meta.json."""
    meta = read_meta(path)
    files = meta["files"]
    for fname in SHARED_FILES:
        if fname not in files:
            raise CheckpointError(f"checkpoint {path!r}: meta.json does not list {fname}")
    for fname in files if names is None else names:
        record, fpath = files.get(fname), os.path.join(path, fname)
        if not isinstance(record, dict) or os.path.basename(fname) != fname:
            raise CheckpointError(f"checkpoint {path!r}: meta.json has no valid record of {fname}")
        if not os.path.isfile(fpath) or os.path.getsize(fpath) != record.get("bytes"):
            raise CheckpointError(f"checkpoint file {fpath!r} is missing or truncated "
                                  f"(expected {record.get('bytes')} bytes)")
        if file_record(fpath)["sha256"] != record.get("sha256"):
            raise CheckpointError(f"checkpoint file {fpath!r} fails its SHA-256 check: its bytes changed "
                                  "after it was written")
    return meta


def problem_with(path: str, names: list[str] | None = None) -> str | None:
    """Why ``path`` cannot be resumed from (``None``: it verifies)."""
    try:
        verify_files(path, names)
    except CheckpointError as e:
        return str(e)
    return None


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint as read: the model's tensors, the engine's optimizer state (DeepSpeed: the
    layout; each rank reads its own slice from ``path``) and the trainer's state."""
    path: str
    tensors: dict
    optimizer_state: dict
    trainer_state: dict

    @property
    def step(self) -> int:
        return int(self.trainer_state["step"])

    @property
    def settings(self) -> dict:
        """The run's settings by flat name (``megatie.config.recorded_settings``)."""
        settings = self.trainer_state.get("settings")
        if not isinstance(settings, dict):
            raise CheckpointError(f"checkpoint {self.path!r} records no settings; it cannot be resumed or exported")
        return settings


def load_checkpoint(path: str) -> Checkpoint:
    """The checkpoint at ``path``, its shared files verified first (every file's SHA-256)."""
    verify_files(path, list(SHARED_FILES))
    try:
        tensors = load_file(os.path.join(path, "model.safetensors"))
        optimizer_state = load_pickle_free(os.path.join(path, "optimizer.pt"))
        trainer_state = load_pickle_free(os.path.join(path, "trainer.pt"))
    except SafetensorError as e:
        raise CheckpointError(f"checkpoint {path!r} is corrupt: {str(e).splitlines()[0]}") from None
    for name, state in (("optimizer.pt", optimizer_state), ("trainer.pt", trainer_state)):
        if not isinstance(state, dict):  # sealed and loadable, but not what megatie writes
            raise CheckpointError(f"checkpoint {path!r}: {name} holds a {type(state).__name__}, not megatie's state")
    return Checkpoint(path, tensors, optimizer_state, trainer_state)


def load_pickle_free(path: str):
    """``torch.load`` that builds tensors and plain containers only: anything else is refused."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint file {path!r} was refused: {first}") from None


# ---------------------------------------------------------------------- the checkpoints of a run
def step_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: str) -> list[str]:
    """Complete step checkpoints under ``root``, oldest first by step number."""
    if not os.path.isdir(root):
        return []
    steps = [(int(m.group(1)), n) for n in os.listdir(root) if (m := _STEP_DIR.match(n))]
    return [os.path.join(root, n) for _, n in sorted(steps) if os.path.isfile(os.path.join(root, n, "meta.json"))]


def prune_checkpoints(root: str, keep: int) -> None:
    for path in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def set_aside(path: str) -> str:
    """Rename a damaged checkpoint out of the run's timeline, keeping its bytes for inspection."""
    target = os.path.join(os.path.dirname(path), f"damaged-{os.path.basename(path)}")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(path, target)
    return target
