"""The weights through a regroup: never two copies of them, and flattened where there is room.

DeepSpeed's optimizers for stages 1-2 (and stage 0 with fp16/bf16) keep the model's weights in flat
buffers, one per param group, and every parameter is a view into one. A rebuild flattens the new
groups into new buffers; an old buffer dies only once every parameter viewing it has been re-pointed,
which - the old and new groups being cut differently - is near the end of the rebuild. Old and new
weights were alive together: one whole extra copy of the weights per rank, measured.

Between steps every trainable weight equals its fp32 master cast to the weight's dtype (DeepSpeed
copies the masters into the weights after each step and builds the masters from the weights), and
the carried state holds the master of every tensor that lives on. So:

1. ``release_weights``: before the rebuild, each parameter whose master is carried gives up its
   storage for a placeholder of its shape (one element, expanded: no memory). The old flat buffers die
   here, before any new one exists.
2. DeepSpeed flattens the placeholders into the new buffers (zeros) and re-points the parameters.
   torch's ``_flatten_dense_tensors`` makes each input contiguous first - a placeholder would become
   a full-size temporary, one more copy of a group's weights (measured at 4 ranks, where the weights
   outweigh a rank's share of the state) - so while DeepSpeed builds, its flatten writes each tensor
   straight into the new buffer (``lean_rebuild``). ``materialize_left`` gives real storage
   to any parameter a wrapper did not re-point (stage 0's unflattened optimizers).
3. ``restore_weights``: after the carried masters are in place, each rank casts the slices of the
   masters it owns into the weights and sends them to the other ranks; an unpartitioned master is
   copied on every rank.

Tensors without carried state (a block leaving the frozen phase, a relaxed tie's new delta) have no
master to come back from. On one rank they keep their storage and are moved into the new buffer one
tensor at a time (``flatten_straight``). Under ZeRO-1/2 on several ranks each rank keeps an fp32 share
of their values (``zero_state.stash_sources``) and they are released too: held whole beside the new
flat buffer, they would add one copy of their weights on every rank, where the state is only a share;
their weights come back from the shares as soon as their group's flat buffer exists, before
DeepSpeed builds its masters from it (``unstash_weights``, called from ``lean_rebuild`` - hence only
under DeepSpeed's ZeRO-1/2 optimizer, whose flattening that hook follows), so the shares never live
beside the new masters.
A frozen replica is not trainable and is not touched. ``device_room`` decides where DeepSpeed
flattens (see ``flatten_where_room``). ``rebuild_quietly`` and ``NamesByParam`` keep DeepSpeed's
constructors (every stage) from work that is right once at start-up and wasted at every regroup.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch._utils import _flatten_dense_tensors

from megatie.engines.zero_state import EVERY_RANK, _run_plan, flat_views


def _placeholder(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=p.dtype, device=p.device).expand(p.shape)


def release_weights(params, source_of: dict) -> dict[int, int]:
    """Placeholders for every parameter of ``params`` whose master is carried (``id(param)`` in
    ``source_of``). Returns ``{id(param): key of its placeholder's storage}``."""
    released = {}
    for p in params:
        if id(p) in source_of:
            p.data = _placeholder(p)
            released[id(p)] = p.untyped_storage()._cdata
    return released


def materialize_left(params, released: dict[int, int]) -> None:
    """Real storage for a released parameter the rebuild did not re-point into a flat buffer."""
    for p in params:
        if released.get(id(p)) == p.untyped_storage()._cdata:
            p.data = torch.empty(p.shape, dtype=p.dtype, device=p.device)


def _weights_from_holders(targets: list, rank: int, world: int, comm_device: torch.device) -> int:
    """``targets``: ``(key, weight, holders, own)`` - a weight's flat view, which rank holds which range
    of its values (``(rank or EVERY_RANK, lo, hi)``) and ``own(lo, hi)``, this rank's source of a range
    it holds. Each rank writes (casting) what it holds into its weights and sends those ranges to every
    other rank. Consumes ``targets`` (its sources can go before the exchange). Returns the most staging
    bytes one wave used."""
    local_dst, local_src, plan, flat = [], [], [], {}
    for key, weight, holders, own in targets:
        flat[key] = weight
        for holder, lo, hi in holders:
            if holder in (rank, EVERY_RANK):
                local_dst.append(weight[lo:hi])
                local_src.append(own(lo, hi))
            if holder != EVERY_RANK:
                plan += [(holder, dst, key, lo, hi, 1) for dst in range(world) if dst != holder]
    targets.clear()
    with torch.no_grad():
        for dst, src in zip(local_dst, local_src):
            dst.copy_(src)  # the cast DeepSpeed applies after each step
    del local_src

    def slice_of(key, lo, hi):
        return [flat[key][lo:hi]]

    return _run_plan(plan, slice_of, slice_of, rank, comm_device)


def restore_weights(ds_optimizer, released: dict[int, int], rank: int, world: int,
                    comm_device: torch.device) -> int:
    """Every released weight from its master: own slices cast locally, the others received from their
    owners. Returns the most staging bytes one wave used."""
    targets = []
    for view in flat_views(ds_optimizer, rank):
        master = view.master.detach().view(-1)
        for p, offset in zip(view.params, view.offsets):
            if id(p) in released and view.master is not p:  # stage 0 fp32: the weight is the master
                at = offset - view.start
                targets.append((id(p), p.data.view(-1), view.ranges(offset, p.numel(), world),
                                lambda lo, hi, master=master, at=at: master[at + lo:at + hi]))
    return _weights_from_holders(targets, rank, world, comm_device)


def flatten_straight(tensors) -> torch.Tensor:
    """``torch._utils._flatten_dense_tensors`` without a contiguous copy of each input: the same values
    in a new 1-D buffer, each tensor (a placeholder included) written into its slice directly. A
    parameter is moved, not copied: once written it is re-pointed to its slice (where DeepSpeed puts it
    next), so its own storage - a tensor without carried state, such as a block leaving the frozen
    phase - is freed before the next is written, not after the whole group."""
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=tensors[0].device)
    pos = 0
    for t in tensors:
        piece = flat[pos:pos + t.numel()].view(t.shape)
        piece.copy_(t)
        if isinstance(t, torch.nn.Parameter):
            t.data = piece
        pos += t.numel()
    return flat


@contextmanager
def lean_rebuild(unstash=None):
    """While DeepSpeed builds its optimizer: its ZeRO-1/2 and bf16 optimizers flatten with
    ``flatten_straight`` (``torch_flatten_again`` gives the built optimizer torch's function back for
    training's gradient buckets), and the ZeRO-1/2 constructor does not allocate an fp32 gradient
    partition for every group only to drop it again: it does that to initialise Adagrad's state, and
    keeps the partitions only with CPU offload (measured: a transient of the masters' size, the peak of
    a regroup that starts blocks training). ``unstash(params)``, when given, runs once each ZeRO-1/2
    group's weights are in their flat buffer, before DeepSpeed builds the group's masters from them:
    stashed weights come back there, and their shares go before any master exists."""
    import deepspeed.runtime.bf16_optimizer as bf16_optimizer
    import deepspeed.runtime.zero.stage_1_and_2 as stage_1_and_2

    zero = stage_1_and_2.DeepSpeedZeroOptimizer
    modules = (stage_1_and_2, bf16_optimizer)
    saved = [m._flatten_dense_tensors for m in modules], zero.initialize_optimizer_states, zero._update_model_bit16_weights
    real_init, real_update = saved[1], saved[2]

    def initialize_optimizer_states(self):
        if self.cpu_offload or isinstance(self.optimizer, torch.optim.Adagrad):
            return real_init(self)

    def update_model_bit16_weights(self, group_index):
        real_update(self, group_index)
        if unstash is not None:
            unstash(self.bit16_groups[group_index])

    for m in modules:
        m._flatten_dense_tensors = flatten_straight
    zero.initialize_optimizer_states = initialize_optimizer_states
    zero._update_model_bit16_weights = update_model_bit16_weights
    try:
        yield
    finally:
        for m, original in zip(modules, saved[0]):
            m._flatten_dense_tensors = original
        zero.initialize_optimizer_states, zero._update_model_bit16_weights = saved[1], saved[2]


def torch_flatten_again(ds_optimizer) -> None:
    if getattr(ds_optimizer, "flatten", None) is flatten_straight:
        ds_optimizer.flatten = _flatten_dense_tensors


def unstash_weights(params, stashed: dict, rank: int, world: int, comm_device: torch.device) -> int:
    """The weights of ``params`` that have stashed shares (``zero_state.stash_sources``), from those
    shares: each rank writes its own and sends it to the others. Their entries leave ``stashed`` (the
    shares are freed). Every rank must call it with the same ``params``. Returns the most staging
    bytes one wave used."""
    targets = []
    for p in params:
        source = stashed.pop(id(p), None)
        if source is not None:
            targets.append((id(p), p.data.view(-1), source.holders,
                            lambda lo, hi, source=source: source.slices(lo, hi)[0]))
    return _weights_from_holders(targets, rank, world, comm_device)


def device_room(accelerator, free_memory=None) -> int:
    """Bytes a new buffer can take on the device, by the allocator's own numbers: what the device has
    free plus what the caching allocator holds unused. DeepSpeed asks only the first (NVML's free
    memory), which a cache holding freed buffers - a rebuild keeps its cache - makes small.
    ``free_memory`` is the accelerator's own ``available_memory`` (when that attribute is patched)."""
    if accelerator.device_name() == "cuda" and torch.cuda.is_available():
        free = torch.cuda.mem_get_info()[0]  # the driver's figure: without NVML DeepSpeed returns total - allocated
    else:
        free = (free_memory or accelerator.available_memory)()
    return int(free) + max(0, int(accelerator.memory_reserved()) - int(accelerator.memory_allocated()))


@contextmanager
def flatten_where_room(accelerator):
    """While DeepSpeed rebuilds: it flattens a param group on the device when ``available_memory()``
    covers the flat buffer, else on the host (a copy through host memory per group); here that figure
    is ``device_room``."""
    own, patched_before = accelerator.available_memory, "available_memory" in vars(accelerator)
    accelerator.available_memory = lambda device_index=None: device_room(accelerator, own)
    try:
        yield
    finally:
        if patched_before:
            accelerator.available_memory = own
        else:
            del accelerator.available_memory


@contextmanager
def rebuild_quietly():
    """While megatie rebuilds the optimizer: DeepSpeed's ZeRO-1/2 constructor empties the CUDA cache
    (and resets the peak-memory counters) once per param group, and the bf16 optimizer runs a full
    ``gc.collect()`` and prints a memory report per group. Right once at start-up, wasted at every
    regroup: the allocator would return and re-request every cached block."""
    import deepspeed.runtime.bf16_optimizer as bf16_optimizer
    import deepspeed.runtime.zero.stage_1_and_2 as stage_1_and_2
    import deepspeed.runtime.zero.utils as zero_utils

    saved = (stage_1_and_2.empty_cache, bf16_optimizer.see_memory_usage, zero_utils.gc)
    stage_1_and_2.empty_cache = lambda: None
    bf16_optimizer.see_memory_usage = lambda *args, **kwargs: None
    # ZeRO-3's defragment runs a full gc.collect() (0.3 s with a large heap): megatie drops the old
    # buffers by reference, so there is nothing for it to find.
    zero_utils.gc = _NoCollect
    try:
        yield
    finally:
        stage_1_and_2.empty_cache, bf16_optimizer.see_memory_usage, zero_utils.gc = saved


class _NoCollect:
    @staticmethod
    def collect(*args, **kwargs) -> int:
        return 0


class NamesByParam(dict):
    """``{parameter: name}`` for DeepSpeed, with a short repr: ZeRO-3's constructor formats its arguments
    into a debug string whether or not it prints it, and a repr of every parameter costs 0.1 s a rebuild."""

    def __repr__(self) -> str:
        return f"<names of {len(self)} parameters>"
