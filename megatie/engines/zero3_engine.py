"""DeepSpeed ZeRO stage 3 engine that follows the tie groups: parameters partitioned too.

Stage 3 fixes what it manages at ``initialize`` like stages 1-2 (flat shard buffers, fp32 masters,
gradient hooks) and adds module hooks that gather each module's parameters for its forward and backward.
A regroup (at a gradient-accumulation boundary, identically on every rank) therefore rebuilds the stage-3
optimizer on the same DeepSpeed engine, as ``DeepSpeedEngine`` does for stages 1-2, but moves nothing
between ranks (``megatie.engines.zero3``):

1. ``held_slices``: views of this rank's master and moment slices of every tensor that lives on;
2. the old optimizer is released (its module hooks, gradient hooks, buffers); tensors that left the model
   free their shards;
3. the new optimizer is built over the new trainable tensors - untied blocks' tensors were already born as
   partitions of their sources (``LayerTying`` uses ``partitioned_tensors``), so no rank ever holds more of
   the model than DeepSpeed gathers for one module;
4. ``carry_local`` copies each held slice into its new place; the old buffers die with the views.

Per-rank bytes of a regroup (measured, ``megatie.metrics.live_bytes``; benchmarks/zero3_memory.py): the new
flat weight buffer is made while the old one is read, and each moment's new buffer while its old one lives;
at 24 blocks d=384 the rise was at most 0.59 of a rank's state, 0.35 above the level the regroup ends at.
"""

from __future__ import annotations

from contextlib import contextmanager

from megatie.engines.deepspeed_engine import DeepSpeedEngine
from megatie.engines.zero3 import (
    carry_local,
    gathered_state_dict,
    held_slices,
    PartitionedTensors,
    release_partitioned,
)
from megatie.tying.layers import unique_parameters


class Zero3Engine(DeepSpeedEngine):
    """Trainer engine on DeepSpeed ZeRO stage 3 (the interface of ``TorchEngine``)."""

    def __init__(self, model, cfg, device, sync, observer=None):
        super().__init__(model, cfg, device, sync, observer)
        # LayerTying makes an untied block's new tensors, and reads whole ones, with this (docstring, step 3).
        self.partitioned_tensors = PartitionedTensors(next(model.parameters()))

    def _regroup(self, plan) -> int:
        created = {id(p): src for p, src in plan.created}
        source_of = {}  # new trainable tensor -> the tensor whose state it takes (itself if it lives on)
        for p in unique_parameters(self.model, trainable_only=True):
            src = created[id(p)] if id(p) in created else p
            if src is not None:
                source_of[id(p)] = id(src)
        for master in self.optimizer.fp32_partitioned_groups_flat:
            master.grad = None  # a view of the gradient buffer: a held slice would keep that buffer alive
        held = held_slices(self.optimizer, set(source_of.values()))
        source_of = {pid: sid for pid, sid in source_of.items() if sid in held}
        groups = self._groups({pid: held[sid].step for pid, sid in source_of.items()})
        schedule = self._schedule_state()
        del created
        self._release_optimizer()  # the held views keep the old masters and moments, nothing else of it
        for p in plan.removed:
            release_partitioned(p)
        self._rebuild_optimizer(groups)
        carry_local(self.optimizer, held, source_of)
        del held  # the old flat buffers go
        self._restore_schedule(schedule)
        return 0  # nothing is staged: every copy stays on its rank

    def checkpoint_weights(self) -> dict | None:
        return gathered_state_dict(self.model, self.rank)

    @contextmanager
    def full_weights(self):
        """A context in which every parameter of the model is whole on every rank and DeepSpeed's module
        hooks are off: the gradient probe binds each block's slots to tensors of its own, which the hooks
        would take for parameters to gather. The one place the whole model is gathered: once per decision
        of a gradient-probing policy, for one forward and backward."""
        from deepspeed import zero
        from deepspeed.runtime.zero import parameter_offload

        offload = self.optimizer.parameter_offload
        with zero.GatheredParameters(list(unique_parameters(self.model))):
            offload._remove_module_hooks()
            offload.forward_hooks.clear()
            offload.backward_hooks.clear()
            try:
                yield
            finally:
                offload.setup_zero_stage3_hooks()
                parameter_offload.FWD_MODULE_STACK.pop()  # pushed again by the set-up; once is its due
