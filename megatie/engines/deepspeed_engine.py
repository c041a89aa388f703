"""DeepSpeed ZeRO (stages 0-2) engine that follows the tie groups.

DeepSpeed fixes the set of trainable tensors when its optimizer is built: flat buffers, partitions
and gradient hooks are made once, and later changes to ``requires_grad`` or to parameter aliasing
are silently ignored or leak. So at every decision that changes the tie groups - at a
gradient-accumulation boundary, identically on every rank - ``regroup``:

1. describes, on each rank, the slices of the state that lives on it holds
   (``zero_state.describe_sources``: they stay alive, nothing is copied);
2. releases the ZeRO optimizer, its hooks and every other tensor it owns *now*, by dropping its
   references (its reference cycles would otherwise wait for a full garbage collection), and each
   parameter whose master lives on gives up its weight storage (``zero_weights``): the old flat
   weight buffers die before any new one exists;
3. builds a new torch AdamW and ZeRO optimizer over the new unique trainable tensors **on the same
   DeepSpeed engine**: the module stays where it is, nothing is broadcast, communication groups,
   module hooks, step counters and the checkpoint engine are kept, DeepSpeed's per-group cache
   flushes are suppressed for the rebuild, and where it flattens is decided by the allocator's own
   free memory (``zero_weights.flatten_where_room``);
4. sends the held slices point to point straight into their new owners' masters and moments
   (``zero_state.carry``), frees the old ones, and casts the masters back into the weights
   (``zero_weights.restore_weights``);
5. restores the LR schedule and the fp16 loss scaler.

What a regroup costs in memory is measured, not computed (``megatie.metrics.live_bytes``): on each
rank the peak of live bytes during it minus the live bytes before it, DeepSpeed's own buffers
included - about one share of the *new* optimizer state (its masters and moments are allocated
while the old ones are still read).

Adam's bias correction uses a step count per *param group* of a flat ZeRO buffer, while tensors
born at different times have different counts (a block that starts training at the first decision
begins at step 0). Parameters are therefore grouped by (weight decay, step count); with the AdamW
math of ``megatie.engines.optim`` (``foreach=False``) the result equals the plain torch reference.

The rebuild calls DeepSpeed's ``DeepSpeedEngine._configure_optimizer`` / ``_configure_lr_scheduler``
(private; setup.py pins DeepSpeed 0.19.x and tests/test_zero.py fails loudly if they change).
"""

from __future__ import annotations

import os
import shutil
import time

import torch
import torch.distributed as tdist
from safetensors import SafetensorError

from megatie.checkpoint.store import (
    file_record,
    seal_checkpoint_dir,
    start_checkpoint_dir,
    write_shared_files,
    zero_file,
)
from megatie.engines.ds_config import engine_config, offloads_optimizer, zero_stage_of
from megatie.engines.optim import build_adamw, decay_group, lr_factor, lr_scheduler
from megatie.engines.zero_checkpoint import load_zero_slice, save_zero_slice
from megatie.engines.zero_state import (
    carry,
    describe_sources,
    flat_views,
    held_state_bytes,
    inner_optimizer,
    stash_sources,
)
from megatie.engines.zero_weights import (
    NamesByParam,
    flatten_where_room,
    lean_rebuild,
    materialize_left,
    rebuild_quietly,
    release_weights,
    restore_weights,
    torch_flatten_again,
    unstash_weights,
)
from megatie.errors import CheckpointError, ConfigError
from megatie.metrics.live_bytes import TransientMeter
from megatie.models.objectives import model_inputs_on
from megatie.runtime.atomic import replace_dir
from megatie.runtime.distributed import RankSync
from megatie.tying.layers import unique_parameters

# What DeepSpeed's ZeRO-1/2 and bf16 optimizers attach to the parameters they manage; ``_hp_mapping``
# holds the old optimizer's fp32 partition and state, so it must go with the optimizer.
_DS_PARAM_ATTRS = ("_hp_mapping", "grad_accum", "param_idx_in_group", "_index_in_param_group", "_dp_group",
                   "get_full_hp_param", "get_full_hp_grad", "set_full_hp_param", "set_full_hp_grad",
                   "load_hp_checkpoint_state", "_z3_optimizer")
# DeepSpeed's step counters, restored on resume (micro_steps decides its accumulation boundaries).
_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")


class DeepSpeedEngine:
    """Trainer engine (the interface of ``TorchEngine``) on DeepSpeed ZeRO stages 0-2 (3: ``Zero3Engine``)."""

    def __init__(self, model, cfg, device: torch.device, sync: RankSync, observer=None):
        if not tdist.is_initialized():
            raise ConfigError("the DeepSpeed engine needs an initialised process group "
                              "(megatie.runtime.distributed.init_deepspeed_distributed)")
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        self.model, self.cfg, self.device, self.sync, self.observer = model, cfg, device, sync, observer
        self.rank, self.world_size = tdist.get_rank(), tdist.get_world_size()
        self.stage, self.precision = zero_stage_of(cfg.engine.deepspeed_config), cfg.engine.precision
        self.comm_device = torch.device(get_accelerator().current_device_name())
        self.regroups = 0
        groups = self._groups({})
        optimizer, scheduler = self._optimizer_for(groups)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=engine_config(cfg.engine.deepspeed_config, cfg, self.world_size), dist_init_required=False)
        self.basic_optimizer = optimizer
        self._record_layout(groups)

    # ------------------------------------------------------------------ building
    def _groups(self, steps: dict[int, int]) -> list[tuple[int, list]]:
        """Trainable tensors grouped by (decay group, Adam step), in model order."""
        groups: dict[tuple[int, int], list] = {}
        for p in unique_parameters(self.model, trainable_only=True):
            groups.setdefault((decay_group(p), steps.get(id(p), 0)), []).append(p)
        return [(decay, params) for (decay, _), params in groups.items()]

    def _optimizer_for(self, groups):
        cfg, opt = self.cfg, self.cfg.optim
        # Fused on CUDA (build_adamw), but not when the masters it will step are offloaded to the host.
        optimizer = build_adamw([{"params": params, "weight_decay": opt.weight_decay if decay == 0 else 0.0}
                                 for decay, params in groups], opt.lr, (opt.adam_beta1, opt.adam_beta2), opt.adam_eps,
                                fused=False if offloads_optimizer(cfg.engine.deepspeed_config) else None)
        return optimizer, lr_scheduler(optimizer, cfg)

    def _record_layout(self, groups) -> None:
        names = {id(p): n for n, p in self.model.named_parameters()}
        self.layout = [{"decay": decay, "params": [names[id(p)] for p in params]} for decay, params in groups]

    def _release_optimizer(self) -> None:
        """Drop the optimizer, its hooks and every tensor it owns, at once. Some configurations leave
        reference cycles (with CPU offload the old optimizer outlived its regroup until a full
        garbage collection - slow with a large heap - in tests/test_zero.py), so the objects'
        attributes are cleared: their tensors go whatever refers to the objects."""
        old, inner, scheduler = self.optimizer, self.basic_optimizer, self.scheduler
        if hasattr(old, "destroy"):
            old.destroy()
        for p in self.model.parameters():
            p.grad = None
            for attr in _DS_PARAM_ATTRS:
                p.__dict__.pop(attr, None)
        inner.state.clear()
        for obj in {id(o): o for o in (old, inner, scheduler)}.values():
            obj.__dict__.clear()
        e = self.engine
        e.optimizer = e.basic_optimizer = e.lr_scheduler = e.client_optimizer = e.client_lr_scheduler = None
        self.optimizer = self.basic_optimizer = self.scheduler = None

    def _rebuild_optimizer(self, groups, unstash=None) -> None:
        """A new AdamW + ZeRO optimizer over ``groups`` on the existing DeepSpeed engine (``unstash``:
        see ``zero_weights.lean_rebuild``)."""
        from deepspeed.accelerator import get_accelerator

        e = self.engine
        optimizer, scheduler = self._optimizer_for(groups)
        e.param_names = NamesByParam((p, n) for n, p in self.model.named_parameters())  # new tensors need names
        with rebuild_quietly(), flatten_where_room(get_accelerator()), lean_rebuild(unstash):
            e._configure_optimizer(optimizer, [p for _, params in groups for p in params])
        torch_flatten_again(e.optimizer)
        e.client_optimizer, e.client_lr_scheduler = optimizer, scheduler
        e._configure_lr_scheduler()
        if getattr(e, "_support_torch_style_backward", False):
            e.optimizer.register_grad_acc_post_hook(e._backward_post_hook)
        self.optimizer, self.basic_optimizer, self.scheduler = e.optimizer, optimizer, e.lr_scheduler
        self._record_layout(groups)

    def _schedule_state(self) -> dict:
        scaler = getattr(self.optimizer, "loss_scaler", None)
        return {"last_epoch": self.scheduler.last_epoch, "step_count": self.scheduler._step_count,
                "loss_scaler": dict(scaler.__dict__) if scaler is not None else None}

    def _restore_schedule(self, saved: dict) -> None:
        self.scheduler.last_epoch = saved["last_epoch"]
        self.scheduler._step_count = saved["step_count"]
        # The same expression LambdaLR evaluates, so the lr is bit-identical to an unbroken run.
        for group in self.basic_optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_factor(saved["last_epoch"], self.cfg)
        self.scheduler._last_lr = [g["lr"] for g in self.basic_optimizer.param_groups]
        if saved["loss_scaler"] is not None and hasattr(self.optimizer, "loss_scaler"):
            self.optimizer.loss_scaler.__dict__.update(saved["loss_scaler"])

    # ------------------------------------------------------------------ the engine interface
    def train_step(self, micro_batches: list[dict]) -> torch.Tensor:
        """One optimizer step over ``micro_batches``, each the model's inputs (labels included). Returns the
        mean loss as a 0-dim tensor on the device, unread: the caller decides when to wait for it."""
        self.engine.train()
        total = torch.zeros((), dtype=torch.float64, device=self.comm_device)
        for inputs in micro_batches:
            inputs = model_inputs_on(inputs, self.model, self.device)
            loss = self.engine(**inputs).loss
            self.engine.backward(loss)
            if self.observer is not None:
                self.observer.after_backward(self)
            self.engine.step()
            total += loss.detach().to(total) / len(micro_batches)
        if self.world_size > 1:  # every rank reports the global mean (equal token counts per rank)
            tdist.all_reduce(total)
            total /= self.world_size
        return total

    def regroup(self, plan) -> dict:
        """Follow ``plan`` (a ``RegroupPlan``); returns what the run records about it ({} if nothing changed).
        ``regroup_transient_bytes`` is measured (``megatie.metrics.live_bytes``): the most any rank's live
        bytes rose above their level before the regroup, DeepSpeed's own buffers included;
        ``regroup_staging_bytes``: the most any rank staged on the communication device (off-device
        state only)."""
        if not plan.changes_parameters:
            return {}
        if self.engine.micro_steps % self.cfg.optim.grad_accum:
            raise RuntimeError("regroup must happen at a gradient-accumulation boundary")
        t0 = time.perf_counter()
        with TransientMeter(self.device, self.model, self.engine, plan) as meter:
            staged = self._regroup(plan)
        del plan
        seconds = time.perf_counter() - t0
        if self.observer is not None:
            self.observer.at_regroup_peak(self, meter.start_bytes + meter.peak_bytes)
        self.regroups += 1
        # Excess: how far the peak rose above the higher of the levels before and after (the rest of the
        # rise is state that stays, such as that of blocks starting to train).
        excess = meter.peak_bytes - max(0, meter.end_bytes)
        per_rank = self.sync.gather((seconds, meter.peak_bytes, staged, self.optimizer_state_bytes(local=True),
                                     excess))
        return {"regroup_seconds": max(r[0] for r in per_rank),
                "regroup_transient_bytes": max(r[1] for r in per_rank),
                "regroup_excess_bytes": max(r[4] for r in per_rank),
                "regroup_transient_source": meter.source,
                "regroup_staging_bytes": max(r[2] for r in per_rank),
                "optimizer_state_bytes": sum(r[3] for r in per_rank)}

    def _regroup(self, plan) -> int:
        """The regroup itself (module docstring); returns the most staging bytes a transfer wave used."""
        created = {id(p): src for p, src in plan.created}
        wanted, source_of = {}, {}
        for p in unique_parameters(self.model, trainable_only=True):
            src = created[id(p)] if id(p) in created else p
            if src is not None:
                wanted[id(src)] = src
                source_of[id(p)] = id(src)
        sources = describe_sources(self.optimizer, list(wanted.values()), self.rank, self.world_size)
        source_of = {pid: sid for pid, sid in source_of.items() if sid in sources}
        groups = self._groups({pid: sources[sid].step for pid, sid in source_of.items()})
        stashed = {}
        # One rank's share would be the whole tensor: no gain. The shares go back where DeepSpeed's
        # ZeRO-1/2 optimizer flattens (zero_weights.lean_rebuild); the rebuild makes the same kind.
        if self.world_size > 1 and hasattr(self.optimizer, "single_partition_of_fp32_groups"):
            stashed = stash_sources([p for _, group in groups for p in group if id(p) not in source_of],
                                    self.rank, self.world_size)
        del wanted, created
        schedule = self._schedule_state()
        self._release_optimizer()  # the sources keep its masters and moments alive, nothing else of it
        for p in plan.removed:  # nothing computes with it any more: free its storage now
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        params = [p for _, group in groups for p in group]
        released = release_weights(params, source_of)  # the old weight buffers die here (zero_weights)
        released_stashed = release_weights(params, stashed)
        self._rebuild_optimizer(groups, lambda group: unstash_weights(group, stashed, self.rank, self.world_size,
                                                                      self.comm_device))
        if stashed:
            raise RuntimeError("the rebuilt optimizer did not flatten every stashed tensor")
        materialize_left(params, {**released, **released_stashed})
        staged = carry(self.optimizer, sources, source_of, self.rank, self.world_size, self.comm_device)
        del sources  # the old masters and moments go
        staged = max(staged, restore_weights(self.optimizer, released, self.rank, self.world_size,
                                             self.comm_device))
        self._restore_schedule(schedule)
        return staged

    def optimizer_state_bytes(self, local: bool = False) -> int:
        """fp32 masters plus Adam moments, of this rank (``local``) or of all ranks (a collective)."""
        mine = held_state_bytes(self.optimizer, self.rank)
        return mine if local else int(self.sync.sum(mine))

    @property
    def lr(self) -> float:
        return self.basic_optimizer.param_groups[0]["lr"]

    @property
    def optimizer_steps(self) -> int:
        return int(self.engine.global_steps)

    def step_skipped(self) -> bool:
        """Whether fp16's loss scaler skipped the last step (an overflow lowers the scale instead)."""
        return self.precision == "fp16" and not self.engine.was_step_applied()

    def state_dict(self) -> dict:
        """What every rank needs besides its own optimizer slice: the param-group layout to rebuild,
        the schedule, the loss scale and DeepSpeed's step counters. Plain numbers and strings."""
        e, schedule = self.engine, self._schedule_state()
        scaler = schedule["loss_scaler"]
        schedule["loss_scaler"] = None if scaler is None else {
            k: v for k, v in scaler.items() if v is None or isinstance(v, (bool, int, float, str))}
        return {"deepspeed": {"layout": self.layout, "world_size": self.world_size, "stage": self.stage,
                              "precision": self.precision, "schedule": schedule,
                              "counters": {k: int(getattr(e, k)) for k in _COUNTERS}}}

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, root: str, name: str, step: int, trainer_state: dict) -> str:
        """Write ``root/name`` on every rank, atomically as far as a directory rename allows: each
        rank writes its optimizer slice into a temporary directory and hashes it; rank 0 adds the
        shared files and ``meta.json`` (size and SHA-256 of every file) and renames. Checkpoints
        need a filesystem every rank sees."""
        tmp = start_checkpoint_dir(root, name) if self.rank == 0 else None
        tmp = self.sync.broadcast(tmp)
        mine = os.path.join(tmp, zero_file(self.rank))
        weights = self.checkpoint_weights()  # a collective where the weights are partitioned
        try:
            save_zero_slice(self.optimizer, self.rank, mine)
            outcome = (zero_file(self.rank), file_record(mine))
        except (OSError, SafetensorError) as e:  # a full disk on one rank: every rank must hear of it
            outcome = (zero_file(self.rank), f"rank {self.rank} could not write its optimizer slice ({e})")
        outcomes = self.sync.gather(outcome)
        failed = next((what for _, what in outcomes if isinstance(what, str)), None)  # the same on every rank
        final = os.path.join(root, name)
        if failed is None:  # every slice written: rank 0's shared files decide, for every rank
            if self.rank == 0:
                try:
                    write_shared_files(tmp, self.model, self.state_dict(), trainer_state, weights)
                    seal_checkpoint_dir(tmp, dict(outcomes), step=step, engine="deepspeed",
                                        world_size=self.world_size)
                    replace_dir(tmp, final)
                except (CheckpointError, OSError) as e:
                    failed = str(e)
            failed = self.sync.broadcast(failed)
        if failed is not None:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"checkpoint {name!r} was not written: {failed}; is the disk full? The "
                                  "checkpoints written before it are intact")
        self.sync.barrier()
        return final

    def checkpoint_weights(self) -> dict | None:
        """The weights rank 0 writes (None: the model's own tensors, whole on every rank below stage 3)."""
        return None

    def load_state_dict(self, sd: dict) -> None:
        """Rebuild with the checkpoint's param-group layout, then read this rank's optimizer slice."""
        info = sd.get("deepspeed") if isinstance(sd, dict) else None
        path = sd.get("checkpoint_dir") if isinstance(sd, dict) else None
        if not info or not path:
            raise CheckpointError("this checkpoint was not written by the DeepSpeed engine; "
                                  "resume it without --deepspeed")
        for key, mine in (("world_size", self.world_size), ("stage", self.stage), ("precision", self.precision)):
            if info.get(key) != mine:
                raise CheckpointError(f"checkpoint {path!r} was written with {key}={info.get(key)!r}, "
                                      f"this run has {mine!r}; resume with the same DeepSpeed setup")
        self._release_optimizer()
        self._rebuild_optimizer(self._layout_groups(info["layout"], path))
        load_zero_slice(self.optimizer, self.rank, os.path.join(path, zero_file(self.rank)))
        self._restore_schedule(info["schedule"])
        for key, value in info["counters"].items():
            setattr(self.engine, key, int(value))

    def _layout_groups(self, layout: list[dict], path: str) -> list[tuple[int, list]]:
        by_name = dict(self.model.named_parameters())
        trainable = {id(p) for p in unique_parameters(self.model, trainable_only=True)}
        try:
            groups = [(g["decay"], [by_name[n] for n in g["params"]]) for g in layout]
        except KeyError as e:
            raise CheckpointError(f"checkpoint {path!r} names parameter {e} the model does not have") from None
        listed = [id(p) for _, params in groups for p in params]
        if sorted(listed) != sorted(trainable) or len(set(listed)) != len(listed):
            raise CheckpointError(f"checkpoint {path!r}: its optimizer layout does not match the model's "
                                  "trainable tensors")
        return groups

    # ------------------------------------------------------------------ inspection (tests, benchmarks)
    def grad_hook_counts(self) -> dict[str, int]:
        names = {id(p): n for n, p in self.model.named_parameters()}
        return {names[id(p)]: len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
                for p in unique_parameters(self.model, trainable_only=True)}

    def live_state_bytes(self) -> dict[str, int]:
        """Bytes of optimizer-owned tensors this rank holds: fp32 masters and moments."""
        master = sum(v.master.numel() * v.master.element_size() for v in flat_views(self.optimizer, self.rank))
        inner = inner_optimizer(self.optimizer)
        state = sum(v.numel() * v.element_size() for st in inner.state.values() for v in st.values()
                    if isinstance(v, torch.Tensor) and v.dim() > 0)
        return {"master_bytes": master, "optimizer_state_bytes": state}
