"""How much tied blocks disagree: the gradients each block would receive if it held its own weights.

In ``shared`` mode a group's blocks compute with one tensor, and autograd sums their gradients into
it: a group whose members pull in opposite directions trains a compromise that suits none of them.
``block_gradient_gram`` measures that without changing the model or its optimizer: one forward and
backward on a probe batch through ``torch.func.functional_call``, with every block's every slot
bound to its own leaf (a detached alias of the tensor it computes with - no weight is copied), so
each block's gradient comes out separately. The Gram matrix of those per-block gradients (all slots
together) is what a splitting policy needs: cosines within a group, norms, agreement with the group.

Cost: one extra forward/backward per decision and, during it, one gradient per block (as an untied
model's block gradients would take); nothing is kept after the call.
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from megatie.errors import ConfigError


def block_gradient_gram(model, tying, inputs: dict) -> torch.Tensor:
    """``G[i, j] = <g_i, g_j>`` (float64, on the CPU) for the per-block gradients of the loss on ``inputs``."""
    if tying.mode != "shared":
        raise ConfigError("gradient probes need --tie-mode shared (a frozen replica receives no gradient)")
    num_blocks, num_slots = tying.num_blocks, len(tying.slots)
    leaves = [[t.detach().requires_grad_(True) for t in tying.block_tensors(i)] for i in range(num_blocks)]
    bound = {}
    for i in range(num_blocks):
        for k, (prefix, name) in enumerate(tying.slots):
            bound[".".join(p for p in (tying.block_path, str(i), prefix, name) if p)] = leaves[i][k]
    was_training = model.training
    model.eval()  # no dropout: the probe measures the weights, not the noise
    try:
        with torch.enable_grad():
            loss = functional_call(model, bound, args=(), kwargs=inputs, tie_weights=False, strict=False).loss
            flat = [leaf for block in leaves for leaf in block]
            grads = torch.autograd.grad(loss, flat, allow_unused=True)
    finally:
        model.train(was_training)
    gram = torch.zeros(num_blocks, num_blocks, dtype=torch.float64)
    for k in range(num_slots):  # one slot at a time: never all blocks' gradients stacked at once
        rows = [grads[i * num_slots + k] for i in range(num_blocks)]
        stacked = torch.stack([torch.zeros_like(leaves[i][k]).reshape(-1) if g is None else g.reshape(-1)
                               for i, g in enumerate(rows)]).float()
        gram += (stacked @ stacked.T).double().cpu()
    return gram


def group_conflict(gram: torch.Tensor, members: list[int]) -> float:
    """1 - the mean cosine between each member's gradient and the group's summed gradient (what the shared
    tensor receives): 0 when all agree; larger the more members pull elsewhere."""
    sub = gram[members][:, members]
    total = sub.sum().clamp_min(1e-30).sqrt()
    norms = sub.diagonal().clamp_min(1e-30).sqrt()
    return float(1.0 - (sub.sum(dim=1) / (norms * total)).mean())


def cosine(gram: torch.Tensor, i: int, j: int) -> float:
    return float(gram[i, j] / (gram[i, i] * gram[j, j]).clamp_min(1e-60).sqrt())
