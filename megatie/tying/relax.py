"""Relaxed ties (docs/method.md, "Relaxed ties"): what a tied position keeps of its own.

A fully tied position computes with its root's tensors only. A relaxed one keeps some of its own:

- **private slots** are parameters every position owns whatever the tie map says: the norm parameters
  and biases (``--tie-relax norms``), or the part of the block that is not tied (``--tie-parts
  attention`` ties the attention and leaves the MLP and the norms per position);
- **deltas** (``--tie-relax lora:R``): on each tied weight matrix of a ``Linear`` or GPT-2 ``Conv1D``
  module a member position computes with ``root + U @ V``, ``U`` [m, R] and ``V`` [R, n] in the stored
  weight's own layout. The delta is added to the module's output (``(x @ V.T) @ U.T`` for ``Linear``,
  ``(x @ U) @ V`` for ``Conv1D``) rather than materialised as a weight: autograd then keeps R numbers per
  token instead of a whole weight matrix per position.

A delta is initialised when its position is tied, from the truncated SVD of what the position computed
with minus its new root (the best rank-R approximation of what tying would otherwise throw away); where
that difference is zero (a position that never trained) ``U`` starts at zero and ``V`` small and random,
so the delta starts at zero yet receives a gradient. Untying folds the delta into the new root.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from megatie.tying.options import Relax

ATTENTION_PREFIXES = ("attn", "self_attn", "attention", "crossattention")
MLP_PREFIXES = ("mlp", "intermediate", "output")
DELTA_U, DELTA_V = "tie_delta_u", "tie_delta_v"
ZERO_DELTA_STD = 0.02  # V's scale where the delta starts at zero (the families' own init scale)


def slot_part(prefix: str) -> str:
    """``attention``, ``mlp`` or ``other`` (the norms between them), by the slot's first module name."""
    head = prefix.split(".", 1)[0]
    if head in ATTENTION_PREFIXES:
        return "attention"
    if head in MLP_PREFIXES:
        return "mlp"
    return "other"


def private_slots(slots: list[tuple[str, str]], shapes: list[tuple], relax: Relax, parts: str) -> list[bool]:
    """For each slot, whether every position keeps its own tensor there."""
    out = []
    for (prefix, _), shape in zip(slots, shapes):
        untied_part = parts != "all" and slot_part(prefix) != parts
        out.append(untied_part or (relax.norms and len(shape) < 2))
    return out


def supports_delta(module: nn.Module, name: str) -> bool:
    """A low-rank delta is added to the output of ``Linear`` and GPT-2's ``Conv1D`` weight matrices."""
    return name == "weight" and (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D")


def delta_output(module: nn.Module, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Linear):  # weight [out, in]: x @ (U V).T
        return (x @ v.t()) @ u.t()
    return (x @ u) @ v  # Conv1D, weight [in, out]: x @ (U V)


def add_delta(module: nn.Module, args, output):
    """Forward hook on every delta-capable module: adds the position's delta where it has one."""
    u = module._parameters.get(DELTA_U)
    if u is None:
        return None
    return output + delta_output(module, args[0], u, module._parameters[DELTA_V])


def effective_weight(root: torch.Tensor, u: torch.Tensor | None, v: torch.Tensor | None) -> torch.Tensor:
    """What a position computes with: ``root + U @ V`` (the root itself without a delta)."""
    if u is None:
        return root.detach()
    return (root.detach().float() + u.detach().float() @ v.detach().float()).to(root.dtype)


def _generator(seed: int, *key) -> torch.Generator:
    """A stream of its own per (seed, key): the same on every rank, the run's global RNG untouched."""
    digest = hashlib.sha256(repr((seed, *key)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def new_delta(own: torch.Tensor | None, root: torch.Tensor, rank: int, seed: int, key) -> tuple[nn.Parameter, ...]:
    """``(U, V)`` for a position tied to ``root``: the rank-``rank`` truncated SVD of ``own - root``, or a
    zero delta (U = 0, V random) where ``own`` is None or equals the root."""
    m, n = root.shape
    u = torch.zeros(m, rank, dtype=torch.float32)
    v = torch.zeros(rank, n, dtype=torch.float32)
    diff = None if own is None else (own.detach().float() - root.detach().float()).cpu()
    if diff is not None and bool(diff.any()):
        left, values, right = torch.linalg.svd(diff, full_matrices=False)
        k = min(rank, values.numel())
        scale = values[:k].sqrt()
        u[:, :k] = left[:, :k] * scale
        v[:k] = scale[:, None] * right[:k]
    else:
        v.normal_(0.0, ZERO_DELTA_STD, generator=_generator(seed, *key))
    return (nn.Parameter(u.to(device=root.device, dtype=root.dtype)),
            nn.Parameter(v.to(device=root.device, dtype=root.dtype)))


def bind_delta(module: nn.Module, delta: tuple[nn.Parameter, nn.Parameter] | None) -> None:
    """Register (or remove) a position's delta as parameters of its module, so optimizers, DeepSpeed and
    checkpoints see it under a stable name (``...c_attn.tie_delta_u``)."""
    for name, value in zip((DELTA_U, DELTA_V), delta or (None, None)):
        if value is None:
            module._parameters.pop(name, None)
        else:
            module._parameters[name] = value


def is_delta_name(name: str) -> bool:
    return name.endswith((f".{DELTA_U}", f".{DELTA_V}"))
