"""How much tied blocks disagree: the gradients each block would receive if it held its own weights.

In ``shared`` mode a group's blocks compute with one tensor, and autograd sums their gradients into
it: a group whose members pull in opposite directions trains a compromise that suits none of them.
``block_gradient_gram`` measures that without changing the model or its optimizer: one forward and
backward on a probe batch through ``torch.func.functional_call``, with every block's every slot
bound to its own leaf (a detached alias of the tensor it computes with - no weight is copied), so
each block's gradient comes out separately. The Gram matrix of those per-block gradients (all slots
together) is what a splitting policy needs: cosines within a group, norms, agreement with the group.

Cost: one extra forward/backward per decision. Memory: where every block's gradient together fits in
``EXACT_LIMIT_BYTES`` (the tiny and 124M presets), they are taken at once and the Gram matrix is exact.
Above it - an untied model's block gradients are what tying exists to avoid holding (2.9 GB in bf16 for
the paper's 48 blocks of d=1600) - each gradient is folded into a count sketch (a random signed
bucketing to ``SKETCH_DIM`` numbers per block) the moment autograd produces it, and freed: at most one
block tensor's gradient is alive at a time. Sketched inner products are unbiased estimates of the
exact ones, with a relative error around 1/sqrt(SKETCH_DIM) = 0.4% of the norms.
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from megatie.errors import ConfigError

EXACT_LIMIT_BYTES = 512 * 2**20
SKETCH_DIM = 2**16


def block_gradient_gram(model, tying, inputs: dict, exact_limit_bytes: int = EXACT_LIMIT_BYTES,
                        sketch_dim: int = SKETCH_DIM) -> torch.Tensor:
    """``G[i, j] = <g_i, g_j>`` (float64, on the CPU) for the per-block gradients of the loss on ``inputs``:
    exact, or sketched where all blocks' gradients together would exceed ``exact_limit_bytes``."""
    if tying.mode != "shared":
        raise ConfigError("gradient probes need --tie-mode shared (a frozen replica receives no gradient)")
    leaves = [[t.detach().requires_grad_(True) for t in tying.block_tensors(i)] for i in range(tying.num_blocks)]
    block_bytes = sum(t.numel() * t.element_size() for t in leaves[0])
    sketched = tying.num_blocks * block_bytes > exact_limit_bytes and sum(t.numel() for t in leaves[0]) > sketch_dim
    was_training = model.training
    model.eval()  # no dropout: the probe measures the weights, not the noise
    try:
        with torch.enable_grad():
            loss = functional_call(model, _bound(tying, leaves), args=(), kwargs=inputs, tie_weights=False,
                                   strict=False).loss
            if sketched:
                return _sketched_gram(loss, leaves, sketch_dim)
            grads = torch.autograd.grad(loss, [leaf for block in leaves for leaf in block], allow_unused=True)
    finally:
        model.train(was_training)
    return _exact_gram(grads, leaves)


def _bound(tying, leaves) -> dict:
    """Every block's every slot, by its name in the model, bound to that block's own leaf."""
    bound = {}
    for i in range(tying.num_blocks):
        for k in range(len(tying.slots)):
            bound[tying.param_name(i, k)] = leaves[i][k]
    return bound


def _exact_gram(grads, leaves) -> torch.Tensor:
    num_blocks, num_slots = len(leaves), len(leaves[0])
    gram = torch.zeros(num_blocks, num_blocks, dtype=torch.float64)
    for k in range(num_slots):  # one slot at a time: never all blocks' gradients stacked at once
        rows = [grads[i * num_slots + k] for i in range(num_blocks)]
        stacked = torch.stack([torch.zeros_like(leaves[i][k]).reshape(-1) if g is None else g.reshape(-1)
                               for i, g in enumerate(rows)]).float()
        gram += (stacked @ stacked.T).double().cpu()
    return gram


def _sketched_gram(loss, leaves, dim: int) -> torch.Tensor:
    """Count sketch: coordinate c of slot k goes to bucket ``h_k(c)`` with sign ``s_k(c)``, the same for
    every block (so ``<S g_i, S g_j>`` estimates ``<g_i, g_j>`` without bias). Each gradient is folded in
    by a hook as soon as autograd has it, then dropped."""
    device = leaves[0][0].device
    generator = torch.Generator().manual_seed(0)  # fixed: every rank sketches alike, so their Grams average
    buckets = [torch.randint(0, dim, (t.numel(),), generator=generator, dtype=torch.int32).to(device)
               for t in leaves[0]]
    signs = [(torch.randint(0, 2, (t.numel(),), generator=generator, dtype=torch.int8) * 2 - 1).to(device)
             for t in leaves[0]]
    sketches = torch.zeros(len(leaves), dim, dtype=torch.float32, device=device)
    for i, block in enumerate(leaves):
        for k, leaf in enumerate(block):
            leaf.register_post_accumulate_grad_hook(_fold_into(sketches[i], buckets[k], signs[k]))
    torch.autograd.backward(loss, inputs=[leaf for block in leaves for leaf in block])
    sketches = sketches.double()
    return (sketches @ sketches.T).cpu()


def _fold_into(sketch, bucket, sign):
    def fold(leaf):
        sketch.index_add_(0, bucket, leaf.grad.reshape(-1).float() * sign)
        leaf.grad = None  # freed now, not at the end of the backward
    return fold


def group_conflict(gram: torch.Tensor, members: list[int]) -> float:
    """1 - the mean cosine between each member's gradient and the group's summed gradient (what the shared
    tensor receives): 0 when all agree; larger the more members pull elsewhere."""
    sub = gram[members][:, members]
    total = sub.sum().clamp_min(1e-30).sqrt()
    norms = sub.diagonal().clamp_min(1e-30).sqrt()
    return float(1.0 - (sub.sum(dim=1) / (norms * total)).mean())


def cosine(gram: torch.Tensor, i: int, j: int) -> float:
    return float(gram[i, j] / (gram[i, i] * gram[j, j]).clamp_min(1e-60).sqrt())
