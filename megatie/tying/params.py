"""The model's parameters counted and read: each distinct tensor once, and what a ZeRO-3 parameter holds.

Under ZeRO-3 a parameter's ``data`` is an empty placeholder between uses: its elements are ``ds_numel`` and
what this rank holds of it is ``ds_tensor`` (its partition).
"""

from __future__ import annotations

import torch
from torch import nn


def unique_parameters(model: nn.Module, trainable_only: bool = False) -> list[nn.Parameter]:
    """Each distinct parameter tensor once, in module order (``named_parameters`` de-duplicates)."""
    return [p for p in model.parameters() if p.requires_grad or not trainable_only]


def numel(t: torch.Tensor) -> int:
    """Elements of a tensor, also of a ZeRO-3 parameter (whose ``data`` is a placeholder between uses)."""
    return int(getattr(t, "ds_numel", t.numel()))


def local_part(p: torch.Tensor) -> torch.Tensor:
    """What this rank holds of parameter ``p``: its ZeRO-3 partition, or the parameter itself."""
    shard = getattr(p, "ds_tensor", None)
    return p if shard is None else shard


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` element counts, a shared tensor counted once."""
    params = unique_parameters(model)
    return sum(numel(p) for p in params if p.requires_grad), sum(numel(p) for p in params)
