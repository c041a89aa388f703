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
source of an untied block) moves in two hops around that rebuild, each rank touching only slices:

1. ``carry_out`` (old optimizer alive): every rank sends the ranges it owns, straight out of the
   old masters and moments, to an *even split* of the new param groups (each group's tensors laid
   end to end, cut into W equal ranges: a ZeRO partition without its padding). Each rank then holds
   about 1/W of the carried state whichever rank owned it before - a decision that keeps only the
   first blocks does not pile the carried state onto rank 0.
2. ``carry_in`` (new optimizer built): every rank sends its share to the new owners, received in
   place into the new masters and moments. As the even split mirrors ZeRO's own partitioning, most
   of this hop is a local copy.

Which rank holds and needs which element range is derived from the layouts, identically on every
rank; only the data moves, point to point, in waves of bounded size. A rank's extra memory during a
regroup is its share of the split (``Carried.nbytes``, about 1/W of the carried state) plus a
bounded staging buffer only when the state lives off the communication device (CPU offload over
NCCL). Every function here must run on every rank in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    """A parameter whose state lives on: identical on every rank, except where *this* rank reads it."""

    numel: int
    step: int
    has_moments: bool
    holders: list[tuple[int, int, int]]  # (old rank or EVERY_RANK, lo, hi)
    view: FlatView                       # this rank's old flat tensor holding (part of) it
    offset: int                          # its start in that flat tensor

    @property
    def kinds(self) -> int:
        return 1 + len(MOMENTS) if self.has_moments else 1


def describe_sources(ds_optimizer, wanted: list, rank: int, world: int) -> dict[int, Source]:
    """``{id(param): Source}`` for every parameter of ``wanted`` the optimizer tracks. No collective."""
    inner, ids, out = inner_optimizer(ds_optimizer), {id(p) for p in wanted}, {}
    for view in flat_views(ds_optimizer, rank):
        state = inner.state.get(view.master, {})
        has_moments = all(isinstance(state.get(k), torch.Tensor) for k in MOMENTS)
        for p, offset in zip(view.params, view.offsets):
            if id(p) in ids:
                out[id(p)] = Source(p.numel(), _step_of(state) if has_moments else 0, has_moments,
                                    view.ranges(offset, p.numel(), world), view, offset)
    return out


def _old_slices(inner, source: Source, lo: int, hi: int) -> list[torch.Tensor]:
    view, at = source.view, source.offset + lo - source.view.start
    state = inner.state.get(view.master, {})
    tensors = [view.master.detach().view(-1)] + ([state[k].view(-1) for k in MOMENTS] if source.has_moments else [])
    return [t[at:at + hi - lo] for t in tensors]


@dataclass
class Carried:
    """Carried state between the two halves, keyed by the *new* parameter that takes it."""

    kinds: dict[int, int] = field(default_factory=dict)                 # id(new) -> 3 (master+moments) or 1
    steps: dict[int, int] = field(default_factory=dict)                 # id(new) -> Adam step (0: no moments)
    holders: dict[int, list] = field(default_factory=dict)              # id(new) -> (rank, lo, hi) it is held at
    pieces: dict[int, tuple[int, torch.Tensor]] = field(default_factory=dict)  # id(new) -> (lo, [kinds, n]) here
    staging_bytes: int = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self.pieces.values())


def even_split(groups: list[list], world: int, partitioned: bool) -> dict[int, list[tuple[int, int, int]]]:
    """Each group's parameters laid end to end and cut into ``world`` equal ranges - the shape of a
    ZeRO partition without its padding, so most of the second hop stays on its rank."""
    out = {}
    for params in groups:
        total = sum(p.numel() for p in params)
        size, pos = -(-total // world), 0
        for p in params:
            n = p.numel()
            if not partitioned:
                out[id(p)] = [(EVERY_RANK, 0, n)]
            else:
                out[id(p)] = [(r, max(pos, r * size) - pos, min(pos + n, (r + 1) * size) - pos)
                              for r in range(world) if max(pos, r * size) < min(pos + n, (r + 1) * size)]
            pos += n
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


def carry_out(ds_optimizer, sources: dict[int, Source], new_groups: list[list], source_of: dict[int, int],
              rank: int, world: int, comm_device: torch.device) -> Carried:
    """First half, old optimizer alive: every carried range goes from its old holder straight out of
    the old tensors to an even split of the *new* groups. ``source_of`` maps ``id(new param)`` to
    the id of the source whose state it takes (several new tensors may take one source's)."""
    inner, out = inner_optimizer(ds_optimizer), Carried()
    partitioned = any(r != EVERY_RANK for s in sources.values() for r, _, _ in s.holders)
    split = even_split(new_groups, world, partitioned)
    plan = []
    for params in new_groups:
        for q in params:
            source = sources.get(source_of.get(id(q)))
            if source is None:
                continue
            key = id(q)
            out.kinds[key], out.steps[key], out.holders[key] = source.kinds, source.step, split[key]
            for dst, lo, hi in split[key]:
                if dst in (rank, EVERY_RANK):
                    master = source.view.master
                    out.pieces[key] = (lo, torch.empty(source.kinds, hi - lo, dtype=master.dtype, device=master.device))
            plan += [(src, dst, key, lo, hi, source.kinds)
                     for src, dst, lo, hi in _transfers(split[key], source.holders)]

    def read(key, lo, hi):
        return _old_slices(inner, sources[source_of[key]], lo, hi)

    def write(key, lo, hi):
        start, data = out.pieces[key]
        return list(data[:, lo - start:hi - start])

    out.staging_bytes = _run_plan(plan, read, write, rank, comm_device)
    return out


def _new_state(inner, views: list[FlatView], carried: Carried) -> list[list[torch.Tensor]]:
    """For each new view: its master and, where its parameters carry moments, fresh moment tensors
    installed as the optimizer's state (with the carried step)."""
    targets = []
    for view in views:
        keys = [id(q) for q in view.params if id(q) in carried.kinds]
        with_moments = [k for k in keys if carried.kinds[k] > 1]
        if with_moments and len(with_moments) != len(view.params):
            raise RuntimeError("a DeepSpeed param group mixes parameters with and without optimizer state")
        if len({carried.steps[k] for k in with_moments}) > 1:
            raise RuntimeError("a DeepSpeed param group mixes parameters with different Adam step counts")
        tensors = [view.master.detach().view(-1)]
        if with_moments:
            moments = [torch.zeros_like(view.master) for _ in MOMENTS]
            step = adam_step_tensor(carried.steps[with_moments[0]], view.master, inner)
            inner.state[view.master] = {"step": step,
                                        MOMENTS[0]: moments[0], MOMENTS[1]: moments[1]}
            tensors += [m.view(-1) for m in moments]
        targets.append(tensors)
    return targets


def carry_in(ds_optimizer, carried: Carried, rank: int, world: int, comm_device: torch.device) -> int:
    """Second half, new optimizer built: each new owner receives its ranges straight into its masters
    and moments. Parameters without carried state keep what DeepSpeed built (master from their
    weights, no moments, step 0). Returns the most staging bytes used."""
    views = flat_views(ds_optimizer, rank)
    targets = _new_state(inner_optimizer(ds_optimizer), views, carried)
    where, plan = {}, []
    for vi, view in enumerate(views):
        for q, offset in zip(view.params, view.offsets):
            key = id(q)
            if key in carried.kinds:
                where[key] = (vi, offset - view.start)
                needs = view.ranges(offset, q.numel(), world)
                plan += [(src, dst, key, lo, hi, carried.kinds[key])
                         for src, dst, lo, hi in _transfers(needs, carried.holders[key])]

    def read(key, lo, hi):
        start, data = carried.pieces[key]
        return list(data[:, lo - start:hi - start])

    def write(key, lo, hi):
        vi, at = where[key]
        return [t[at + lo:at + hi] for t in targets[vi][:carried.kinds[key]]]

    return _run_plan(plan, read, write, rank, comm_device)
