"""Atomic checkpoints that load safely.

A checkpoint is a directory ``step_XXXXXXXX/`` with
- ``model.safetensors``: every distinct tensor once (a tied group is stored at its root's name);
- ``optimizer.pt`` and ``trainer.pt``: optimizer/scheduler state and trainer state (tie structure,
  agent, history, RNG, data position), loaded with ``torch.load(weights_only=True)``;
- ``meta.json``: format version and file sizes, checked before anything is read.
It is written into a temporary directory and renamed into place, so a crash leaves either the old
checkpoint set or the new one, never a directory that looks complete but is not.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from megatie.errors import CheckpointError
from megatie.metrics import write_json_atomic

FORMAT_VERSION = 2  # 2: trainer state holds one reward generator per rank
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors, each distinct tensor once under the first name it has."""
    out, seen = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        out[name] = tensor.detach().contiguous().cpu()
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


def fsync_dir(path: str) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(root: str, name: str, model: nn.Module, optimizer_state: dict, trainer_state: dict) -> str:
    """Write checkpoint ``root/name`` atomically (replacing an older one of that name)."""
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, name)
    tmp = os.path.join(root, f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(unique_state_dict(model), os.path.join(tmp, "model.safetensors"))
    torch.save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
    torch.save(trainer_state, os.path.join(tmp, "trainer.pt"))
    seal_checkpoint_dir(tmp)
    replace_dir(tmp, final)
    return final


def seal_checkpoint_dir(tmp: str, **meta) -> None:
    """Make every file under ``tmp`` durable and list it, with its size, in ``meta.json`` - written last,
    so a directory with a meta.json is complete (sizes are checked before anything is loaded)."""
    files = {}
    for dirpath, _, filenames in os.walk(tmp):
        for fname in filenames:
            full = os.path.join(dirpath, fname)
            with open(full, "rb") as fh:
                os.fsync(fh.fileno())
            files[os.path.relpath(full, tmp)] = os.path.getsize(full)
    write_json_atomic(os.path.join(tmp, "meta.json"), {"format": FORMAT_VERSION, "files": files, **meta})
    fsync_dir(tmp)


def replace_dir(tmp: str, final: str) -> None:
    """Move the finished directory ``tmp`` to ``final``, replacing an older one of that name; a
    crash leaves either the old or the new directory under ``final``, never half of one."""
    if os.path.exists(final):
        old = f"{final}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(os.path.dirname(final))


def load_checkpoint(path: str) -> tuple[dict, dict, dict]:
    """Return ``(model_tensors, optimizer_state, trainer_state)`` or raise ``CheckpointError``."""
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        files = meta["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint {path!r} has no readable meta.json; it is incomplete or corrupt") from None
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path!r} has format {meta.get('format')}, expected {FORMAT_VERSION}")
    for fname, size in files.items():
        fpath = os.path.join(path, fname)
        if not os.path.isfile(fpath) or os.path.getsize(fpath) != size:
            raise CheckpointError(f"checkpoint file {fpath!r} is missing or truncated (expected {size} bytes)")
    try:
        tensors = load_file(os.path.join(path, "model.safetensors"))
        optimizer_state = torch.load(os.path.join(path, "optimizer.pt"), weights_only=True, map_location="cpu")
        trainer_state = torch.load(os.path.join(path, "trainer.pt"), weights_only=True, map_location="cpu")
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"checkpoint {path!r} is corrupt: {str(e).splitlines()[0]}") from None
    return tensors, optimizer_state, trainer_state


def list_checkpoints(root: str) -> list[str]:
    """Complete step checkpoints under ``root``, oldest first (temporary directories ignored)."""
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if _STEP_DIR.match(n))
    return [os.path.join(root, n) for n in names if os.path.isfile(os.path.join(root, n, "meta.json"))]


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def prune_checkpoints(root: str, keep: int) -> None:
    for path in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def resolve_resume(spec: str, out_dir: str) -> str:
    """``auto``/``latest``: the newest complete checkpoint of ``out_dir``; otherwise a path."""
    if spec in ("auto", "latest"):
        found = list_checkpoints(os.path.join(out_dir, "checkpoints"))
        if not found:
            raise CheckpointError(f"--resume {spec}: no checkpoint under {os.path.join(out_dir, 'checkpoints')!r}")
        return found[-1]
    return spec
