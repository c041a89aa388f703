"""DeepSpeed ZeRO engine that follows the tie groups.

DeepSpeed fixes the set of trainable tensors when ``deepspeed.initialize`` runs: flat buffers,
partitions and gradient hooks are built once, and later changes to ``requires_grad`` or to
parameter aliasing are silently ignored or leak. So at every decision that changes the tie
groups (``RegroupPlan.changes_parameters``), at a gradient-accumulation boundary and identically
on every rank, ``DeepSpeedEngine.regroup``:

1. reads the fp32 master, Adam moments and step count of every tensor that survives or is the
   source of an untied block (one collective per flat group, ``megatie.zero_state``);
2. tears the old engine down completely: ZeRO's gradient hooks, the engine's module hooks, every
   reference to the old engine, optimizer and scheduler; tensors that left the model release
   their storage;
3. builds a new torch AdamW + ``deepspeed.initialize`` over the new unique trainable tensors
   (ZeRO partitions them across ranks again) and writes the carried state into each rank's own
   partition (no collective). Untied blocks start from their source's state, tied blocks' state
   is gone;
4. restores the counters: global steps and samples, the LR schedule, the fp16 loss scaler.

Adam's bias correction uses a step count per *param group* in a flat ZeRO buffer, while tensors
born at different times have different counts (a block that starts training at the first decision
begins at step 0). Parameters are therefore grouped by (weight decay, step count); with the same
AdamW math as ``megatie.optim`` (``foreach=False``) the result equals the plain torch reference.
A decision that leaves the groups unchanged rebuilds nothing.

ZeRO-3 is refused (see ``load_ds_config``).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import time

import torch
import torch.distributed as tdist

from megatie.checkpoint import fsync_dir, replace_dir, unique_state_dict
from megatie.config import TrainConfig
from megatie.errors import CheckpointError, ConfigError
from megatie.metrics import write_json_atomic
from megatie.optim import decay_group
from megatie.tying import RegroupPlan, unique_parameters
from megatie.zero_state import Carry, gather_carry, restore_carry

# ds_config keys owned by megatie's flags: one source of truth for batch, lr and clipping.
OWNED_KEYS = {
    "train_batch_size": "--batch-size (micro-batch per rank) x --grad-accum x world size",
    "train_micro_batch_size_per_gpu": "--batch-size (micro-batch per rank)",
    "gradient_accumulation_steps": "--grad-accum",
    "optimizer": "--lr / --weight-decay (megatie builds the AdamW the tie regroup needs)",
    "scheduler": "--lr-schedule / --warmup-steps",
    "gradient_clipping": "--grad-clip",
}

ZERO3_REFUSAL = (
    "ZeRO stage 3 is not supported with layer tying: stage 3 partitions each parameter itself and "
    "gathers it per module, and tied blocks share parameter objects across modules that ZeRO-3 "
    "fetches and releases independently; rebuilt parameters lose their ds_id bookkeeping and "
    "DeepSpeed's per-parameter state setters do not handle unpadded partitions. Use stage 1 or 2 "
    "(ds_configs/zero2.json, zero2_offload.json for CPU-offloaded optimizer state)")

FORMAT_VERSION = 1  # megatie's checkpoint meta format (shared with megatie.checkpoint)


def load_ds_config(source) -> dict:
    """Read and check a DeepSpeed config (path or dict); raise ``ConfigError`` on anything wrong."""
    if isinstance(source, dict):
        user = json.loads(json.dumps(source))
        where = "the DeepSpeed config"
    else:
        where = f"DeepSpeed config {source!r}"
        if not os.path.isfile(str(source)):
            raise ConfigError(f"{where} does not exist")
        try:
            with open(source, encoding="utf-8") as f:
                user = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ConfigError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(user, dict):
        raise ConfigError(f"{where} must be a JSON object")
    for key, flag in OWNED_KEYS.items():
        if key in user:
            raise ConfigError(f"{where} sets {key!r}; megatie takes it from {flag} - remove it from the config")
    if "activation_checkpointing" in user:
        raise ConfigError(f"{where} has an 'activation_checkpointing' section; use --activation-checkpointing "
                          "(non-reentrant, works with tied blocks) instead")
    zero = user.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{where}: 'zero_optimization' must be an object")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{where}: zero_optimization.stage must be 0, 1 or 2, got {stage!r}")
    if stage == 3:
        raise ConfigError(f"{where}: {ZERO3_REFUSAL}")
    if "offload_param" in zero:
        raise ConfigError(f"{where}: offload_param is a ZeRO-3 feature; use offload_optimizer with stage 1 or 2")
    if "offload_optimizer" in zero and stage == 0:
        raise ConfigError(f"{where}: offload_optimizer needs zero_optimization.stage 1 or 2")
    enabled = [k for k in ("fp16", "bf16") if isinstance(user.get(k), dict) and user[k].get("enabled")]
    if len(enabled) > 1:
        raise ConfigError(f"{where} enables both fp16 and bf16; choose one")
    return user


def engine_config(user: dict, cfg: TrainConfig, world_size: int) -> dict:
    """The user's engine settings plus what megatie owns (batch geometry, clipping)."""
    out = json.loads(json.dumps(user))
    out["train_micro_batch_size_per_gpu"] = cfg.batch_size
    out["gradient_accumulation_steps"] = cfg.grad_accum
    out["train_batch_size"] = cfg.batch_size * cfg.grad_accum * world_size
    if cfg.grad_clip > 0:
        out["gradient_clipping"] = cfg.grad_clip
    # megatie passes torch's AdamW (the reference math) also with CPU offload.
    out.setdefault("zero_force_ds_cpu_optimizer", False)
    out.setdefault("zero_allow_untested_optimizer", True)
    out.setdefault("steps_per_print", 10 ** 9)
    return out


def precision_of(user: dict) -> str:
    for key in ("bf16", "fp16"):
        if isinstance(user.get(key), dict) and user[key].get("enabled"):
            return key
    return "fp32"


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant recomputation of every block (the method's name changed in transformers 5)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class DeepSpeedEngine:
    """Trainer engine (same interface as ``TorchEngine``) on DeepSpeed ZeRO stages 0-2."""

    def __init__(self, model, cfg: TrainConfig, device: torch.device, ds_config=None,
                 activation_checkpointing: bool = False):
        if not tdist.is_initialized():
            raise ConfigError("the DeepSpeed engine needs an initialised process group "
                              "(run through megatie.cli or call deepspeed.init_distributed() first)")
        self.model, self.cfg, self.device = model, cfg, device
        self.user_config = load_ds_config(ds_config if ds_config is not None else {})
        self.rank, self.world_size = tdist.get_rank(), tdist.get_world_size()
        self.config = engine_config(self.user_config, cfg, self.world_size)
        self.stage = int(self.user_config.get("zero_optimization", {}).get("stage", 0))
        self.precision = precision_of(self.user_config)
        from deepspeed.accelerator import get_accelerator

        self.comm_device = torch.device(get_accelerator().current_device_name())
        if activation_checkpointing:
            # Non-reentrant: recomputation stays inside the one backward graph, so a tied tensor's
            # gradient is accumulated once per step and ZeRO's hook fires once (the reentrant
            # variant runs a backward per block: "gradient computed twice", DeepSpeed #2103).
            enable_activation_checkpointing(model)
        self.regroups = 0
        self.regroup_seconds = 0.0
        self.engine = self.optimizer = self.scheduler = None
        # Each teardown needs a full garbage collection (engine, optimizer and hooks form reference
        # cycles). Freezing what exists now (imported libraries, the model) keeps that scan short.
        gc.collect()
        gc.freeze()
        self._build(self._default_groups({}), {}, None)

    # ------------------------------------------------------------------ building
    def _names(self) -> dict[int, str]:
        return {id(p): n for n, p in self.model.named_parameters()}

    def _default_groups(self, carry_of: dict[int, Carry]) -> list[tuple[int, list]]:
        """Trainable tensors grouped by (decay group, Adam step), in model order."""
        groups: dict[tuple[int, int], list] = {}
        for p in unique_parameters(self.model, trainable_only=True):
            c = carry_of.get(id(p))
            step = c.step if c is not None and c.moments is not None else 0
            groups.setdefault((decay_group(p), step), []).append(p)
        return [(decay, params) for (decay, _), params in groups.items()]

    def _build(self, groups, carry_of: dict[int, Carry], counters: dict | None) -> None:
        import deepspeed
        from megatie.trainer import lr_factor

        cfg = self.cfg
        param_groups = [{"params": params, "weight_decay": cfg.weight_decay if decay == 0 else 0.0}
                        for decay, params in groups]
        optimizer = torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
                                      weight_decay=cfg.weight_decay, foreach=False)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
        engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=scheduler, config=self.config,
            dist_init_required=False)
        self.engine, self.optimizer, self.scheduler = engine, ds_optimizer, ds_scheduler
        self.basic_optimizer = optimizer
        names = self._names()
        self.layout = [{"decay": decay, "params": [names[id(p)] for p in params]} for decay, params in groups]
        if carry_of:
            restore_carry(ds_optimizer, carry_of, self.rank)
        if counters is not None:
            for key in ("global_steps", "global_samples", "skipped_steps", "micro_steps"):
                setattr(engine, key, counters[key])
            scheduler.last_epoch = counters["last_epoch"]
            scheduler._step_count = counters["step_count"]
            # The same expression LambdaLR evaluates, so the lr is bit-identical to an unbroken run.
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * lr_factor(scheduler.last_epoch, cfg)
            scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
            if counters.get("loss_scaler") is not None and hasattr(ds_optimizer, "loss_scaler"):
                ds_optimizer.loss_scaler.__dict__.update(counters["loss_scaler"])

    def _counters(self) -> dict:
        e = self.engine
        scaler = getattr(self.optimizer, "loss_scaler", None)
        return {"global_steps": e.global_steps, "global_samples": e.global_samples,
                "skipped_steps": e.skipped_steps, "micro_steps": e.micro_steps,
                "last_epoch": self.scheduler.last_epoch, "step_count": self.scheduler._step_count,
                "loss_scaler": dict(scaler.__dict__) if scaler is not None else None}

    def _teardown(self) -> None:
        """Remove every hook and reference of the current engine so that it is collected."""
        engine = self.engine
        engine.destroy()
        for name in ("module_forward_pre_hook", "module_forward_post_hook"):
            handle = getattr(engine, name, None)
            if handle is not None:
                handle.remove()
        for p in self.model.parameters():
            p.grad = None
            for attr in ("_hp_mapping", "grad_accum", "param_idx_in_group"):
                if hasattr(p, attr):
                    delattr(p, attr)
        self.engine = self.optimizer = self.scheduler = self.basic_optimizer = None
        del engine
        gc.collect()

    # ------------------------------------------------------------------ the engine interface
    def train_step(self, micro_batches: list[torch.Tensor]) -> float:
        self.engine.train()
        total = 0.0
        for batch in micro_batches:
            batch = batch.to(self.device)
            loss = self.engine(input_ids=batch, labels=batch).loss
            self.engine.backward(loss)
            self.after_backward()
            self.engine.step()
            total += float(loss.detach().float() / len(micro_batches))
        if self.world_size > 1:
            # Every rank reports the global mean (equal token counts per rank).
            t = torch.tensor([total], dtype=torch.float64, device=self.comm_device)
            tdist.all_reduce(t)
            total = float(t.item()) / self.world_size
        return total

    def after_backward(self) -> None:
        """Called after each backward, before the step (gradients exist, activations are freed);
        a no-op here, overridden by the memory benchmark's probe."""

    def regroup(self, plan: RegroupPlan) -> None:
        if not plan.changes_parameters:
            return
        if self.engine.micro_steps % self.cfg.grad_accum:
            raise RuntimeError("regroup must happen at a gradient-accumulation boundary")
        t0 = time.perf_counter()
        sources = {id(p): src for p, src in plan.created}
        new_params = unique_parameters(self.model, trainable_only=True)
        wanted, seen = [], set()
        for p in new_params:
            src = sources[id(p)] if id(p) in sources else p
            if src is not None and id(src) not in seen:
                seen.add(id(src))
                wanted.append(src)
        carry = gather_carry(self.optimizer, wanted, self.rank, self.world_size, self.comm_device)
        carry_of = {}
        for p in new_params:
            src = sources[id(p)] if id(p) in sources else p
            if src is not None and id(src) in carry:
                carry_of[id(p)] = carry[id(src)]
        counters = self._counters()
        self._teardown()
        for p in plan.removed:
            # Nothing computes with it any more: free its storage now, not when the plan dies.
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        del plan, carry, wanted, sources
        self._build(self._default_groups(carry_of), carry_of, counters)
        del carry_of
        self.regroups += 1
        self.regroup_seconds += time.perf_counter() - t0

    @property
    def lr(self) -> float:
        return self.basic_optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        """What megatie itself needs to rebuild the engine before DeepSpeed loads its checkpoint."""
        return {"deepspeed": {"layout": self.layout, "world_size": self.world_size, "stage": self.stage,
                              "precision": self.precision}}

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, root: str, name: str, trainer_state: dict) -> str:
        """Write ``root/name`` through DeepSpeed on every rank, atomically as far as a directory
        rename allows: DeepSpeed writes under a temporary tag; rank 0 adds megatie's files and
        ``meta.json`` (sizes of every file, checked before loading), renames, then updates
        ``latest`` last."""
        os.makedirs(root, exist_ok=True)
        tmp_tag = f".{name}.tmp"
        tmp, final = os.path.join(root, tmp_tag), os.path.join(root, name)
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        tdist.barrier()
        self.engine.save_checkpoint(root, tag=tmp_tag, client_state={"megatie": trainer_state},
                                    save_latest=False)
        tdist.barrier()
        if self.rank == 0:
            from safetensors.torch import save_file

            # Framework-free weights (each tied tensor once) and what the trainer restores first.
            save_file(unique_state_dict(self.model), os.path.join(tmp, "model.safetensors"))
            torch.save(self.state_dict(), os.path.join(tmp, "optimizer.pt"))
            torch.save(trainer_state, os.path.join(tmp, "trainer.pt"))
            files = {}
            for dirpath, _, filenames in os.walk(tmp):
                for fname in filenames:
                    full = os.path.join(dirpath, fname)
                    with open(full, "rb") as fh:
                        os.fsync(fh.fileno())
                    files[os.path.relpath(full, tmp)] = os.path.getsize(full)
            write_json_atomic(os.path.join(tmp, "meta.json"), {"format": FORMAT_VERSION, "files": files,
                                                              "engine": "deepspeed"})
            fsync_dir(tmp)
            replace_dir(tmp, final)
            self._write_latest(root, name)
        tdist.barrier()
        if self.rank != 0 and os.path.isdir(tmp):  # node-local storage: each node renames its own
            replace_dir(tmp, final)
        tdist.barrier()
        return final

    @staticmethod
    def _write_latest(root: str, name: str) -> None:
        tmp = os.path.join(root, f".latest.tmp-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(name)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(root, "latest"))

    def load_state_dict(self, sd: dict) -> None:
        """Rebuild with the checkpoint's param-group layout, then let DeepSpeed load it."""
        info = sd.get("deepspeed") if isinstance(sd, dict) else None
        path = sd.get("checkpoint_dir") if isinstance(sd, dict) else None
        if not info or not path:
            raise CheckpointError("this checkpoint was not written by the DeepSpeed engine; "
                                  "resume it without --deepspeed")
        for key, mine in (("world_size", self.world_size), ("stage", self.stage), ("precision", self.precision)):
            if info.get(key) != mine:
                raise CheckpointError(f"checkpoint {path!r} was written with {key}={info.get(key)!r}, "
                                      f"this run has {mine!r}; resume with the same DeepSpeed setup")
        by_name = dict(self.model.named_parameters())
        trainable = {id(p) for p in unique_parameters(self.model, trainable_only=True)}
        try:
            groups = [(g["decay"], [by_name[n] for n in g["params"]]) for g in info["layout"]]
        except KeyError as e:
            raise CheckpointError(f"checkpoint {path!r} names parameter {e} the model does not have") from None
        listed = [id(p) for _, params in groups for p in params]
        if sorted(listed) != sorted(trainable) or len(set(listed)) != len(listed):
            raise CheckpointError(f"checkpoint {path!r}: its optimizer layout does not match the model's "
                                  "trainable tensors")
        self._teardown()
        self._build(groups, {}, None)
        root, tag = os.path.split(os.path.normpath(path))
        try:
            loaded, _ = self.engine.load_checkpoint(root, tag=tag, load_module_strict=True,
                                                    load_optimizer_states=True, load_lr_scheduler_states=True)
        except Exception as e:  # DeepSpeed raises assorted types for truncated or foreign files
            raise CheckpointError(f"DeepSpeed could not load checkpoint {path!r}: "
                                  f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        if loaded is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint at {path!r}")

    # ------------------------------------------------------------------ inspection (tests, benchmarks)
    def grad_hook_counts(self) -> dict[str, int]:
        names = self._names()
        return {names[id(p)]: len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
                for p in unique_parameters(self.model, trainable_only=True)}

    def live_state_bytes(self) -> dict[str, int]:
        """Bytes of optimizer-owned tensors: fp32 masters and moments this rank holds."""
        from megatie.zero_state import flat_views

        seen, master, state = set(), 0, 0
        for view in flat_views(self.optimizer, self.rank):
            if id(view.master) not in seen:
                seen.add(id(view.master))
                master += view.master.numel() * view.master.element_size()
        for st in self.basic_optimizer.state.values():
            state += sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, torch.Tensor))
        return {"master_bytes": master, "optimizer_state_bytes": state}
