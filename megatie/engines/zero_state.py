"""Optimizer state carried through a regroup, sharded: no rank ever holds more than its own slice.

Every optimizer DeepSpeed builds for stages 0-2 keeps the fp32 master weights as *flat* tensors,
one per param group, and the inner torch optimizer keeps its state (``exp_avg``, ``exp_avg_sq``,
``step``) keyed by those flat tensors:

- ``DeepSpeedZeroOptimizer`` (ZeRO-1/2, any dtype): each rank owns one equal slice of every
  group's flat buffer (``single_partition_of_fp32_groups``); parameters sit at
  ``round_robin_bit16_offsets`` (per-parameter alignment padding included);
- ``BF16_Optimizer`` (ZeRO-1, bf16 with fp32 gradient accumulation): the same partitioned layout,
  no per-parameter padding;
- ``FP16_Optimizer`` (stage 0 with fp16/bf16): one unpartitioned flat fp32 copy per group;
- ``FP16_UnfusedOptimizer`` (its fallback without fused kernels): one fp32 copy per tensor;
- no wrapper (stage 0, fp32): the torch optimizer itself, state keyed by each parameter.

``FlatView`` describes one such flat tensor uniformly. A regroup replaces the optimizer with one
over the new set of trainable tensors; the state of every tensor that lives on (a survivor, or the
source of an untied block) moves in one hop:

1. ``describe_sources`` (old optimizer alive): which rank holds which element range of each source,
   and this rank's old master and moment tensors, which stay alive with the description when the
   old optimizer is released;
2. the new optimizer is built;
3. ``carry``: every rank sends the ranges it holds straight into the new owners' masters and moments,
   point to point in waves of bounded size; a range that stays on its rank is a local copy.

Which rank holds and needs which element range is derived from the layouts, identically on every
rank; only the data moves. A rank's extra memory during a regroup is its share of the *new* state
(the old one is freed after the hop), plus a bounded staging buffer only when the state lives off
the communication device (CPU offload over NCCL). The earlier two-hop design (carried out to an even
split before the rebuild, in after it) held a copy of the carried state beside the new state: a rank's rise
was up to 1.68x its share of the new state on one rank. At stage 0 nothing is partitioned: every rank
holds, and carries, the whole state. Every function here must run on every rank in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as tdist

from megatie.engines.optim import adam_step_tensor, state_bytes
from megatie.kernels import multi_tensor_copy_

MOMENTS = ("exp_avg", "exp_avg_sq")
EVERY_RANK = -1  # holder/needer rank of an unpartitioned tensor: each rank has its own full copy
WAVE_MESSAGES, WAVE_ELEMENTS = 256, 1 << 26  # one wave of point-to-point messages: at most this many / this big


@dataclass
class FlatView:
    params: list            # the low-precision (model) parameters laid out in this flat tensor
    offsets: list[int]      # each parameter's start in the full (unpartitioned) flat tensor
    master: torch.Tensor    # this rank's fp32 slice (the inner optimizer's state key)
    start: int              # where ``master`` starts in the full flat tensor
    partitioned: bool       # True: every rank holds an equal slice

    def ranges(self, offset: int, numel: int, world: int) -> list[tuple[int, int, int]]:
        """``(rank, lo, hi)``: the element range ``[lo, hi)`` of the parameter at ``offset`` each rank holds."""
        if not self.partitioned:
            return [(EVERY_RANK, 0, numel)]
        size = self.master.numel()
        out = []
        for r in range(world):
            lo, hi = max(offset, r * size) - offset, min(offset + numel, (r + 1) * size) - offset
            if lo < hi:
                out.append((r, lo, hi))
        return out


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
                                master, rank * size, True))
        return out
    if hasattr(ds_optimizer, "fp32_partitioned_groups_flat"):
        # ZeRO-3: each parameter is partitioned on its own; offsets are within this rank's flat master, and
        # the stage-3 regroup carries per-parameter slices locally (engines/zero3.py), never by ``ranges``.
        return [FlatView(params, offsets, master, 0, False) for params, offsets, master in shard_views(ds_optimizer)]
    if hasattr(ds_optimizer, "fp32_groups_flat_partition"):  # BF16_Optimizer
        out = []
        for i, master in enumerate(ds_optimizer.fp32_groups_flat_partition):
            params = list(ds_optimizer.bf16_groups[i])
            out.append(FlatView(params, _cumulative(params), master, rank * master.numel(), True))
        return out
    if hasattr(ds_optimizer, "fp32_groups_flat"):  # FP16_Optimizer (stage 0, fp16/bf16)
        groups = getattr(ds_optimizer, "fp16_groups", None) or ds_optimizer.bf16_groups
        return [FlatView(list(groups[i]), _cumulative(groups[i]), master, 0, False)
                for i, master in enumerate(ds_optimizer.fp32_groups_flat)]
    if hasattr(ds_optimizer, "fp32_groups") and hasattr(ds_optimizer, "fp16_groups"):
        # FP16_UnfusedOptimizer (stage 0, fp16/bf16 without fused kernels): one fp32 copy per tensor.
        return [FlatView([p], [0], q, 0, False)
                for lows, highs in zip(ds_optimizer.fp16_groups, ds_optimizer.fp32_groups)
                for p, q in zip(lows, highs)]
    if isinstance(ds_optimizer, torch.optim.Optimizer):  # stage 0, fp32: the parameters are the masters
        return [FlatView([p], [0], p, 0, False) for group in ds_optimizer.param_groups for p in group["params"]]
    raise NotImplementedError(f"megatie cannot regroup a {type(ds_optimizer).__name__}; "
                              "use ZeRO stage 0, 1 or 2")


def shard_views(ds_optimizer) -> list[tuple[list, list[int], torch.Tensor]]:
    """Per flat fp32 master of a stage-3 optimizer: its parameters, each one's start in it (shards
    back to back, padding included) and the master itself."""
    out = []
    for params, master in zip(ds_optimizer.fp16_groups, ds_optimizer.fp32_partitioned_groups_flat):
        offsets, pos = [], 0
        for p in params:
            offsets.append(pos)
            pos += p.partition_numel()
        out.append((list(params), offsets, master))
    return out


def inner_optimizer(ds_optimizer) -> torch.optim.Optimizer:
    if isinstance(ds_optimizer, torch.optim.Optimizer) and not hasattr(ds_optimizer, "optimizer"):
        return ds_optimizer
    return ds_optimizer.optimizer


def _step_of(state: dict) -> int:
    step = state.get("step", 0)
    return int(step.item() if isinstance(step, torch.Tensor) else step)


def held_state_bytes(ds_optimizer, rank: int) -> int:
    """fp32 masters plus Adam state this rank holds (padding included)."""
    masters = sum(v.master.numel() * v.master.element_size() for v in flat_views(ds_optimizer, rank))
    return masters + state_bytes(inner_optimizer(ds_optimizer).state)


@dataclass
class Source:
    """A parameter whose state lives on: identical on every rank, except what *this* rank holds of it."""

    numel: int
    step: int
    has_moments: bool
    holders: list[tuple[int, int, int]]  # (old rank or EVERY_RANK, lo, hi)
    tensors: list[torch.Tensor]          # this rank's old master and moments, flat (they stay alive with it)
    at: int                              # the parameter's start in them

    @property
    def kinds(self) -> int:
        return 1 + len(MOMENTS) if self.has_moments else 1

    def slices(self, lo: int, hi: int) -> list[torch.Tensor]:
        return [t[self.at + lo:self.at + hi] for t in self.tensors]


def describe_sources(ds_optimizer, wanted: list, rank: int, world: int) -> dict[int, Source]:
    """``{id(param): Source}`` for every parameter of ``wanted`` the optimizer tracks. No collective."""
    inner, ids, out = inner_optimizer(ds_optimizer), {id(p) for p in wanted}, {}
    for view in flat_views(ds_optimizer, rank):
        state = inner.state.get(view.master, {})
        has_moments = all(isinstance(state.get(k), torch.Tensor) for k in MOMENTS)
        tensors = [view.master.detach().view(-1)] + ([state[k].view(-1) for k in MOMENTS] if has_moments else [])
        for p, offset in zip(view.params, view.offsets):
            if id(p) in ids:
                out[id(p)] = Source(p.numel(), _step_of(state) if has_moments else 0, has_moments,
                                    view.ranges(offset, p.numel(), world), tensors, offset - view.start)
    return out


def stash_sources(params, rank: int, world: int) -> dict[int, Source]:
    """``{id(param): Source}`` for tensors with no state to carry (a block leaving the frozen phase, a new
    delta) under a partitioned optimizer: their values kept as a master would keep them - in fp32, each
    rank an even share of each - so that their storage can be released before the rebuild like the
    others' (the weights are not partitioned: held whole beside the new flat buffer they were W shares),
    and their masters and weights rebuilt from the shares."""
    out = {}
    for p in params:
        n = p.numel()
        size = -(-n // world)
        holders = [(r, r * size, min(n, (r + 1) * size)) for r in range(world) if r * size < n]
        lo, hi = min(n, rank * size), min(n, (rank + 1) * size)
        piece = p.detach().reshape(-1)[lo:hi].to(torch.float32, copy=True)
        out[id(p)] = Source(n, 0, False, holders, [piece], -lo)
    return out


def _transfers(needs: list[tuple[int, int, int]], holders: list[tuple[int, int, int]]):
    """``(src, dst, lo, hi)`` for every overlap of what each rank needs with what each rank holds."""
    for dst, a, b in needs:
        for src, c, d in holders:
            lo, hi = max(a, c), min(b, d)
            if lo < hi:
                yield src, dst, lo, hi


def _run_plan(plan, read, write, rank: int, comm_device: torch.device) -> int:
    """Carry out ``plan`` - ``(src, dst, key, lo, hi, kinds)`` in the same order on every rank - with
    ``read(key, lo, hi)`` / ``write(key, lo, hi)`` giving the ``kinds`` source / destination tensors.
    Local ranges are copied; the others travel point to point in waves of at most ``WAVE_MESSAGES``
    messages and (but for a single larger tensor) ``WAVE_ELEMENTS`` elements, which bounds the
    staging buffers. Every rank cuts the same waves from the same plan, so sends and receives pair
    up. Returns the most staging bytes one wave used."""
    local_dst, local_src, waves = [], [], [[]]
    count = size = 0
    for src, dst, key, lo, hi, kinds in plan:
        if count and (count + kinds > WAVE_MESSAGES or size + kinds * (hi - lo) > WAVE_ELEMENTS):
            waves.append([])
            count = size = 0
        count, size = count + kinds, size + kinds * (hi - lo)
        if src in (rank, EVERY_RANK) and dst in (rank, EVERY_RANK):
            local_dst += write(key, lo, hi)
            local_src += read(key, lo, hi)
        elif src == rank:
            waves[-1] += [("send", dst, t) for t in read(key, lo, hi)]
        elif dst == rank:
            waves[-1] += [("recv", src, t) for t in write(key, lo, hi)]
    multi_tensor_copy_(local_dst, local_src)
    return max((_exchange(wave, comm_device) for wave in waves), default=0)


def _exchange(wave: list, comm_device: torch.device) -> int:
    """Post one wave of sends and receives, wait for all; returns the staging bytes it needed."""
    ops, landing, staged = [], [], 0
    for kind, peer, tensor in wave:
        buffer = tensor
        if tensor.device != comm_device:  # e.g. CPU-offloaded state over NCCL: travel via the device
            buffer = tensor.to(comm_device) if kind == "send" else torch.empty_like(tensor, device=comm_device)
            staged += buffer.numel() * buffer.element_size()
            if kind == "recv":
                landing.append((tensor, buffer))
        ops.append(tdist.P2POp(tdist.isend if kind == "send" else tdist.irecv, buffer, peer))
    if ops:
        for request in tdist.batch_isend_irecv(ops):
            request.wait()
    for tensor, buffer in landing:
        tensor.copy_(buffer)
    return staged


def _new_state(inner, views: list[FlatView], kinds: dict[int, int], steps: dict[int, int]) -> list[list[torch.Tensor]]:
    """For each new view: its master and, where its parameters carry moments (``kinds`` 3, by ``id``),
    fresh moment tensors installed as the optimizer's state (with the carried ``steps``)."""
    targets = []
    for view in views:
        keys = [id(q) for q in view.params if id(q) in kinds]
        with_moments = [k for k in keys if kinds[k] > 1]
        if with_moments and len(with_moments) != len(view.params):
            raise RuntimeError("a DeepSpeed param group mixes parameters with and without optimizer state")
        if len({steps[k] for k in with_moments}) > 1:
            raise RuntimeError("a DeepSpeed param group mixes parameters with different Adam step counts")
        tensors = [view.master.detach().view(-1)]
        if with_moments:
            moments = [torch.zeros_like(view.master) for _ in MOMENTS]
            step = adam_step_tensor(steps[with_moments[0]], view.master, inner)
            inner.state[view.master] = {"step": step, MOMENTS[0]: moments[0], MOMENTS[1]: moments[1]}
            tensors += [m.view(-1) for m in moments]
        targets.append(tensors)
    return targets


def carry(ds_optimizer, sources: dict[int, Source], source_of: dict[int, int], rank: int, world: int,
          comm_device: torch.device) -> int:
    """The new optimizer built, the old state still held by ``sources``: every range of every new
    tensor that takes a source's state (``source_of``: ``id(new param)`` -> ``id(source)``; several
    may take one source's) goes from the rank holding it in the old optimizer straight into the rank
    owning it in the new one - masters and moments. Parameters without a source keep what DeepSpeed
    built (master from their weights, no moments, step 0). Returns the most staging bytes one wave used."""
    views = flat_views(ds_optimizer, rank)
    taking = [q for v in views for q in v.params if id(q) in source_of]
    kinds = {id(q): sources[source_of[id(q)]].kinds for q in taking}
    steps = {id(q): sources[source_of[id(q)]].step for q in taking}
    targets = _new_state(inner_optimizer(ds_optimizer), views, kinds, steps)
    where, plan = {}, []
    for vi, view in enumerate(views):
        for q, offset in zip(view.params, view.offsets):
            key = id(q)
            if key in kinds:
                where[key] = (vi, offset - view.start)
                needs = view.ranges(offset, q.numel(), world)
                plan += [(src, dst, key, lo, hi, kinds[key])
                         for src, dst, lo, hi in _transfers(needs, sources[source_of[key]].holders)]

    def read(key, lo, hi):
        return sources[source_of[key]].slices(lo, hi)

    def write(key, lo, hi):
        vi, at = where[key]
        return [t[at + lo:at + hi] for t in targets[vi][:kinds[key]]]

    return _run_plan(plan, read, write, rank, comm_device)
