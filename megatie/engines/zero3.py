"""ZeRO-3 pieces of a regroup: parameters that exist only as per-rank partitions.

Under stage 3 every parameter is split on its own: rank r holds elements ``[r * s, (r + 1) * s)`` of the
flattened tensor in ``param.ds_tensor`` (``s = ceil(numel / world)``, the last rank's tail padded), and
``param.data`` is empty except while a module that uses it runs (DeepSpeed gathers it in the module's
forward and backward hooks and releases it as its live budget says). A tied block's modules hold their
root's parameter object, so the root is gathered when a position computes with it - once a step within
DeepSpeed's default budget, per use with a small one (benchmarks/zero3_gathers.py) - and autograd sums every
position's gradient into it before DeepSpeed's one reduce-scatter per step (measured: stage 3 equals
the plain torch engine to the bit through regroups, tests/test_zero3.py).

Because the split is per parameter, a tensor's shard on a rank depends on nothing but the tensor and
the number of ranks. So a regroup never moves data between ranks:

- an untied block's new tensor is born partitioned, its shard a local copy of its source's shard
  (``partitioned_clone``: no gather, no broadcast; the only full-size allocation is one uninitialised
  tensor, one at a time, that DeepSpeed's partitioner reads its shard from and frees);
- a tensor that leaves the model frees its shard (``release_partitioned``);
- masters and Adam moments move as local copies of each source's slice into its new owner's slice of the
  rebuilt optimizer's flat buffers (``held_slices`` before the rebuild, ``carry_local`` after).

``gathered_state_dict`` writes a checkpoint's weights: one tensor gathered at a time, kept on rank 0's host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from megatie.checkpoint.store import unique_state_dict
from megatie.engines.optim import adam_step_tensor
from megatie.engines.zero_state import MOMENTS, inner_optimizer, shard_views


def is_partitioned(p: torch.Tensor) -> bool:
    """Whether ``p`` is a ZeRO-3 parameter (its weights live in ``ds_tensor`` shards)."""
    return hasattr(p, "ds_id") and hasattr(p, "ds_tensor")


def _partitioner_of(param: nn.Parameter):
    """DeepSpeed's ``zero.Init`` object that partitioned ``param`` (the one its bound helpers close over)."""
    for cell in getattr(param.convert_to_zero_parameters, "__closure__", None) or ():
        if hasattr(cell.cell_contents, "_convert_to_deepspeed_param"):
            return cell.cell_contents
    raise RuntimeError("DeepSpeed's ZeRO-3 parameters no longer expose their partitioner; megatie supports "
                       "the DeepSpeed release setup.py pins")


def partitioned_clone(source: nn.Parameter) -> nn.Parameter:
    """A new trainable ZeRO-3 parameter holding ``source``'s weights, made from this rank's shard alone."""
    init = _partitioner_of(source)
    # Only the shape is read before the shard is overwritten: the partitioner copies this rank's part
    # of it into a fresh shard and frees it.
    p = nn.Parameter(torch.empty(source.ds_shape, dtype=source.dtype, device=source.ds_tensor.device),
                     requires_grad=True)
    init._convert_to_deepspeed_param(p)
    p.partition()
    with torch.no_grad():
        p.ds_tensor.copy_(source.ds_tensor)
    return p


class PartitionedTensors:
    """What ``LayerTying`` needs to make and read tensors that exist only as partitions (its ``partitioned``):

    - ``clone(source, delta)``: an untied block's new tensor from its source's local partition, a member's
      delta ``U @ V`` folded in (its shard of the product: the delta's factors are gathered, one slot at a
      time);
    - ``whole(tensors)``: a context in which ``tensors`` are whole on every rank (a new delta is the SVD of
      what a position computed with minus its new root: one slot at a time);
    - ``adopt(params)``: make new whole tensors (deltas) partitioned parameters, rank 0's values on every rank.
    """

    def __init__(self, anchor: nn.Parameter):
        self.anchor = anchor  # any ZeRO-3 parameter of the model: its partitioner makes the new ones

    def clone(self, source: nn.Parameter, delta: tuple | None = None) -> nn.Parameter:
        p = partitioned_clone(source)
        if delta is not None:
            with self.whole(delta), torch.no_grad():
                product = (delta[0].float() @ delta[1].float()).view(-1)
                shard = p.ds_tensor.view(-1)
                start = p.ds_zero_partition_rank * shard.numel()
                n = max(0, min(shard.numel(), product.numel() - start))
                shard[:n] = (shard[:n].float() + product[start:start + n]).to(shard.dtype)  # as effective_weight
        return p

    def whole(self, tensors):
        from deepspeed import zero

        unique = {id(t): t for t in tensors if is_partitioned(t)}
        return zero.GatheredParameters(list(unique.values()))

    def adopt(self, params) -> None:
        init = _partitioner_of(self.anchor)
        for p in params:
            init._zero_init_param(p)


def release_partitioned(p: nn.Parameter) -> None:
    """Free what a parameter that left the model holds: its shard (a view into the old optimizer's flat
    buffer, which would otherwise outlive it) and any gathered copy."""
    p.data = torch.empty(0, dtype=p.dtype, device=p.device)
    if getattr(p, "ds_tensor", None) is not None:
        p.ds_tensor.data = torch.empty(0, dtype=p.ds_tensor.dtype, device=p.ds_tensor.device)


@dataclass
class HeldSlice:
    """One parameter's slice of this rank's master and moments (views: they keep the old buffers alive)."""

    step: int
    tensors: list[torch.Tensor | None]  # master (None: it is the weights), then the moments (once stepped)


def held_slices(ds_optimizer, wanted: set[int]) -> dict[int, HeldSlice]:
    """The slices of the parameters in ``wanted`` (ids), read from the optimizer before it is released."""
    inner, out = inner_optimizer(ds_optimizer), {}
    for params, offsets, master in shard_views(ds_optimizer):
        state = inner.state.get(master, {})
        step = state.get("step", 0)
        step = int(step.item() if isinstance(step, torch.Tensor) else step)
        # In fp32 training the weights are the masters' exact copies (each step copies one into the other)
        # and the rebuilt optimizer makes its masters from the weights: holding the old masters would only
        # keep them alive beside the new ones.
        exact = bool(params) and master.dtype == params[0].ds_tensor.dtype
        flats = [None if exact else master] + [state[k] for k in MOMENTS if isinstance(state.get(k), torch.Tensor)]
        for p, at in zip(params, offsets):
            if id(p) in wanted:
                n = p.partition_numel()
                out[id(p)] = HeldSlice(step, [None if t is None else t.view(-1).narrow(0, at, n) for t in flats])
    return out


def carry_local(ds_optimizer, held: dict[int, HeldSlice], source_of: dict[int, int]) -> None:
    """Write each carried slice into its new owner's place in the rebuilt optimizer (``source_of``: new
    parameter id -> the id its state comes from). One kind at a time - masters, then each moment - and
    the old buffer of a kind is let go (its views dropped) before the next kind's new buffer is made: a
    rank's rise stays about one weight share above where it began. Groups were formed by Adam step, so
    each flat master has one step; moments are zero where nothing is carried (a tensor starting fresh)."""
    inner = inner_optimizer(ds_optimizer)
    views = shard_views(ds_optimizer)
    placed = [[(at, p.partition_numel(), held[source_of[id(p)]]) for p, at in zip(params, offsets)
               if source_of.get(id(p)) in held] for params, offsets, _ in views]
    with torch.no_grad():
        for kind in range(1 + len(MOMENTS)):
            for (_, _, master), carried in zip(views, placed):
                carried = [c for c in carried if len(c[2].tensors) > kind and c[2].tensors[kind] is not None]
                if not carried:
                    continue
                if kind == 0:
                    target = master
                else:
                    state = inner.state.setdefault(master, {"step": adam_step_tensor(carried[0][2].step, master,
                                                                                         inner)})
                    target = state[MOMENTS[kind - 1]] = torch.zeros_like(master)
                for at, n, hs in carried:
                    target.view(-1).narrow(0, at, n).copy_(hs.tensors[kind])
            for hs in held.values():  # the old buffer of this kind dies here
                if len(hs.tensors) > kind:
                    hs.tensors[kind] = None


def gathered_state_dict(model: nn.Module, rank: int) -> dict[str, torch.Tensor] | None:
    """The model's tensors (``unique_state_dict``), gathered one at a time on every rank and kept on rank 0's
    host (None elsewhere): the weights a checkpoint and an export hold."""
    from deepspeed import zero

    def read(tensor):
        if not is_partitioned(tensor):
            return tensor.detach().contiguous().cpu() if rank == 0 else None
        with zero.GatheredParameters([tensor]):
            return tensor.detach().contiguous().cpu().clone() if rank == 0 else None

    weights = unique_state_dict(model, read)
    return weights if rank == 0 else None
