"""Reading and writing per-parameter optimizer state inside DeepSpeed's optimizers, batched.

Every optimizer DeepSpeed builds for stages 0-2 keeps the fp32 master weights as *flat* tensors,
one per param group, and the inner torch optimizer keeps its state (``exp_avg``, ``exp_avg_sq``,
``step``) keyed by those flat tensors:

- ``DeepSpeedZeroOptimizer`` (ZeRO-1/2, any dtype): each rank owns one equal slice of every
  group's flat buffer (``single_partition_of_fp32_groups``); parameters sit at
  ``round_robin_bit16_offsets`` (per-parameter alignment padding included);
- ``BF16_Optimizer`` (ZeRO-1 with bf16): the same partitioned layout, no per-parameter padding;
- ``FP16_Optimizer`` (stage 0 with fp16/bf16): one unpartitioned flat fp32 copy per group;
- ``FP16_UnfusedOptimizer`` (its fallback without fused kernels): one fp32 copy per tensor;
- no wrapper (stage 0, fp32): the torch optimizer itself, state keyed by each parameter.

``FlatView`` describes one such flat tensor uniformly. ``gather_carry`` reads what a set of
parameters carries (fp32 master, both moments, step) with **one collective per flat group**
instead of DeepSpeed's three all-reduces per parameter (``safe_get_full_*``), and
``restore_carry`` writes it into a freshly built optimizer, each rank only into the slice it
owns (no collective at all). Both must run identically on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as tdist

from megatie.kernels import multi_tensor_copy_

MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class FlatView:
    params: list            # the low-precision (model) parameters laid out in this flat tensor
    offsets: list[int]      # each parameter's start in the full (unpartitioned) flat tensor
    master: torch.Tensor    # this rank's fp32 slice (the inner optimizer's state key)
    start: int              # where ``master`` starts in the full flat tensor
    partitioned: bool       # True: every rank holds an equal slice, gather to read it all
    group_index: int        # index of the inner optimizer's param group


@dataclass
class Carry:
    """What one parameter brings into a rebuilt optimizer (full, unpartitioned, flat fp32)."""

    master: torch.Tensor
    moments: tuple[torch.Tensor, torch.Tensor] | None  # None: no state yet (never stepped)
    step: int


def _cumulative(params) -> list[int]:
    out, pos = [], 0
    for p in params:
        out.append(pos)
        pos += p.numel()
    return out


def flat_views(ds_optimizer, rank: int) -> list[FlatView]:
    """Describe the fp32 master tensors of a DeepSpeed (or plain torch) optimizer."""
    if hasattr(ds_optimizer, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        out = []
        for i, master in enumerate(ds_optimizer.single_partition_of_fp32_groups):
            size = int(ds_optimizer.partition_size[i])
            out.append(FlatView(list(ds_optimizer.round_robin_bit16_groups[i]),
                                [int(o) for o in ds_optimizer.round_robin_bit16_offsets[i]],
                                master, rank * size, True, i))
        return out
    if hasattr(ds_optimizer, "fp32_groups_flat_partition"):  # BF16_Optimizer
        out = []
        for i, master in enumerate(ds_optimizer.fp32_groups_flat_partition):
            params = list(ds_optimizer.bf16_groups[i])
            out.append(FlatView(params, _cumulative(params), master, rank * master.numel(), True, i))
        return out
    if hasattr(ds_optimizer, "fp32_groups_flat"):  # FP16_Optimizer (stage 0, fp16/bf16)
        groups = getattr(ds_optimizer, "fp16_groups", None) or ds_optimizer.bf16_groups
        return [FlatView(list(groups[i]), _cumulative(groups[i]), master, 0, False, i)
                for i, master in enumerate(ds_optimizer.fp32_groups_flat)]
    if hasattr(ds_optimizer, "fp32_groups") and hasattr(ds_optimizer, "fp16_groups"):
        # FP16_UnfusedOptimizer (stage 0, fp16/bf16 without fused kernels): one fp32 copy per tensor.
        return [FlatView([p], [0], q, 0, False, i)
                for i, (lows, highs) in enumerate(zip(ds_optimizer.fp16_groups, ds_optimizer.fp32_groups))
                for p, q in zip(lows, highs)]
    if isinstance(ds_optimizer, torch.optim.Optimizer):  # stage 0, fp32: the parameters are the masters
        return [FlatView([p], [0], p, 0, False, gi)
                for gi, group in enumerate(ds_optimizer.param_groups) for p in group["params"]]
    raise NotImplementedError(f"megatie cannot regroup a {type(ds_optimizer).__name__}; "
                              "use ZeRO stage 0, 1 or 2")


def _inner(ds_optimizer) -> torch.optim.Optimizer:
    if isinstance(ds_optimizer, torch.optim.Optimizer) and not hasattr(ds_optimizer, "optimizer"):
        return ds_optimizer
    return ds_optimizer.optimizer


def _step_of(state: dict) -> int:
    step = state.get("step", 0)
    return int(step.item() if isinstance(step, torch.Tensor) else step)


def _all_gather(local: torch.Tensor, world: int, comm_device: torch.device) -> torch.Tensor:
    src = local.to(comm_device)
    out = torch.empty(world * src.numel(), dtype=src.dtype, device=comm_device)
    try:
        tdist.all_gather_into_tensor(out, src)
    except (RuntimeError, NotImplementedError):  # backends without the fused variant
        tdist.all_gather(list(out.chunk(world)), src)
    return out.to(local.device)


def gather_carry(ds_optimizer, wanted: list, rank: int, world: int, comm_device) -> dict[int, Carry]:
    """``{id(param): Carry}`` for every parameter in ``wanted`` that the optimizer tracks."""
    inner = _inner(ds_optimizer)
    wanted_ids = {id(p) for p in wanted}
    out: dict[int, Carry] = {}
    for view in flat_views(ds_optimizer, rank):
        hits = [(p, o) for p, o in zip(view.params, view.offsets) if id(p) in wanted_ids]
        # Every rank takes part in every group's collective, wanted parameters or not.
        state = inner.state.get(view.master, {})
        has_moments = all(isinstance(state.get(k), torch.Tensor) for k in MOMENTS)
        parts = [view.master.detach().reshape(-1)]
        if has_moments:
            parts += [state[k].reshape(-1) for k in MOMENTS]
        local = torch.cat(parts) if len(parts) > 1 else parts[0]
        n = view.master.numel()
        if view.partitioned and world > 1:
            full = _all_gather(local, world, comm_device).view(world, len(parts), n)
            full = full.transpose(0, 1).reshape(len(parts), world * n)
        else:
            full = local.view(len(parts), n)
        if not hits:
            continue
        step = _step_of(state) if has_moments else 0
        dsts, srcs = [], []
        for p, o in hits:
            pieces = [torch.empty(p.numel(), dtype=full.dtype, device=full.device) for _ in parts]
            dsts += pieces
            srcs += [full[k, o:o + p.numel()] for k in range(len(parts))]
            out[id(p)] = Carry(pieces[0], (pieces[1], pieces[2]) if has_moments else None, step)
        multi_tensor_copy_(dsts, srcs)
        del full, local
    return out


def restore_carry(ds_optimizer, carry_of: dict[int, Carry], rank: int) -> None:
    """Write carried state into a freshly built optimizer; each rank fills only its own slice.

    ``carry_of`` maps ``id(new_param)`` to its Carry (a parameter without one starts fresh: its
    master is what DeepSpeed built from the model weights, no moments, step 0). All parameters
    of a group must agree on having moments and on the step count (the engine groups them so).
    """
    inner = _inner(ds_optimizer)
    for view in flat_views(ds_optimizer, rank):
        carried = [(p, o, carry_of[id(p)]) for p, o in zip(view.params, view.offsets) if id(p) in carry_of]
        if not carried:
            continue
        with_moments = [c for _, _, c in carried if c.moments is not None]
        if with_moments and len(with_moments) != len(view.params):
            raise RuntimeError("a DeepSpeed param group mixes parameters with and without optimizer state")
        if len({c.step for _, _, c in carried}) > 1:
            raise RuntimeError("a DeepSpeed param group mixes parameters with different Adam step counts")
        master = view.master.detach().view(-1)
        lo, hi = view.start, view.start + master.numel()
        moments = None
        if with_moments:
            moments = [torch.zeros_like(view.master) for _ in MOMENTS]
        dsts, srcs = [], []
        for p, o, c in carried:
            a, b = max(lo, o), min(hi, o + p.numel())
            if a >= b:
                continue
            dsts.append(master[a - lo:b - lo])
            srcs.append(c.master[a - o:b - o].to(master.device))
            if moments is not None:
                for k in range(len(MOMENTS)):
                    dsts.append(moments[k].view(-1)[a - lo:b - lo])
                    srcs.append(c.moments[k][a - o:b - o].to(master.device))
        multi_tensor_copy_(dsts, srcs)
        if moments is not None:
            # torch's AdamW keeps a CPU float32 step tensor unless capturable/fused.
            inner.state[view.master] = {"step": torch.tensor(float(with_moments[0].step), dtype=torch.float32),
                                        MOMENTS[0]: moments[0], MOMENTS[1]: moments[1]}

