"""Each rank's slice of a DeepSpeed optimizer in a checkpoint, as safetensors - no pickle.

DeepSpeed's own ``save_checkpoint`` pickles whole Python objects and its ``load_checkpoint``
unpickles them with ``torch.load(weights_only=False)``: a crafted checkpoint would run code. What
a resumed run needs from the optimizer is plain data: for every flat fp32 master tensor this rank
holds (``zero_state.FlatView``, the same description the regroup uses), the master slice, its two
Adam moments and its step. Each rank writes ``zero_rank_XXXXX.safetensors`` with exactly that
(tensors ``<i>.master``, ``<i>.exp_avg``, ``<i>.exp_avg_sq``; steps and sizes in the header's
metadata) and reads its own back into an optimizer rebuilt with the checkpoint's layout.
"""

from __future__ import annotations

import json

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megatie.engines.optim import adam_step_tensor
from megatie.engines.zero_state import MOMENTS, flat_views, inner_optimizer
from megatie.errors import CheckpointError


def _step_of(state: dict) -> int | None:
    if not all(isinstance(state.get(k), torch.Tensor) for k in MOMENTS):
        return None  # never stepped: no moments yet
    step = state.get("step", 0)
    return int(step.item() if isinstance(step, torch.Tensor) else step)


def save_zero_slice(ds_optimizer, rank: int, path: str) -> None:
    """Write this rank's masters and moments to ``path``."""
    inner, tensors, views = inner_optimizer(ds_optimizer), {}, []
    for i, view in enumerate(flat_views(ds_optimizer, rank)):
        state = inner.state.get(view.master, {})
        step = _step_of(state)
        tensors[f"{i}.master"] = view.master.detach().reshape(-1).cpu()
        if step is not None:
            for k in MOMENTS:
                tensors[f"{i}.{k}"] = state[k].detach().reshape(-1).cpu()
        views.append({"numel": view.master.numel(), "step": step})
    save_file(tensors, path, metadata={"views": json.dumps(views), "rank": str(rank)})


def load_zero_slice(ds_optimizer, rank: int, path: str) -> None:
    """Fill the optimizer (built over the checkpoint's layout, same ranks) with this rank's slice."""
    try:
        with safe_open(path, framework="pt") as f:
            saved = json.loads((f.metadata() or {})["views"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {path!r} is not a megatie optimizer slice: {e}") from None
    views = flat_views(ds_optimizer, rank)
    if [v.master.numel() for v in views] != [s.get("numel") for s in saved]:
        raise CheckpointError(f"checkpoint file {path!r} does not fit this optimizer's partitions; resume with "
                              "the same DeepSpeed config and number of ranks")
    inner = inner_optimizer(ds_optimizer)
    with torch.no_grad():
        for i, (view, record) in enumerate(zip(views, saved)):
            view.master.view(-1).copy_(tensors[f"{i}.master"])
            if record["step"] is None:
                inner.state.pop(view.master, None)
                continue
            inner.state[view.master] = {
                "step": adam_step_tensor(record["step"], view.master, inner),
                **{k: tensors[f"{i}.{k}"].to(view.master.device).view_as(view.master) for k in MOMENTS}}
