"""The optimizer pieces every engine shares: one AdamW builder, the LR schedule, and the plain-torch
regroup that follows the tie groups.

After every decision the optimizer must hold exactly the unique trainable tensors of the model:
survivors keep their state, an untied block starts with a copy of its source's state (moments and
step count), a tied block's state is dropped so its memory is freed. ``regroup_optimizer`` does this
for a plain torch AdamW; it is the reference the DeepSpeed engine is checked against, step for step.
"""

from __future__ import annotations

import inspect
import math
from collections import defaultdict

import torch
from torch import nn

from megatie.kernels import multi_tensor_copy_
from megatie.tying.layers import RegroupPlan, unique_parameters


def decay_group(param: torch.Tensor) -> int:
    """0: weight-decayed (matrices, embeddings), 1: not decayed (biases, norm scales). A ZeRO-3 parameter's
    own shape is ``ds_shape`` (its ``data`` is an empty placeholder between uses)."""
    return 0 if len(getattr(param, "ds_shape", param.shape)) >= 2 else 1


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    groups = [{"params": [], "weight_decay": weight_decay}, {"params": [], "weight_decay": 0.0}]
    for p in unique_parameters(model, trainable_only=True):
        groups[decay_group(p)]["params"].append(p)
    return groups


# torch's fused AdamW (one multi-tensor kernel per step) where this torch has it.
FUSED_ADAMW = "fused" in inspect.signature(torch.optim.AdamW.__init__).parameters


def fused_applies(params) -> bool:
    """Whether the fused kernel is used for ``params``: when every one is a CUDA tensor. Elsewhere (CPU
    runs, optimizer state offloaded to the host) the per-parameter loop keeps the exact reference."""
    params = list(params)
    return FUSED_ADAMW and bool(params) and all(p.device.type == "cuda" for p in params)


def build_adamw(groups: list[dict], lr: float, betas=(0.9, 0.95), eps: float = 1e-8,
                fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over ``groups`` (each with its own ``weight_decay``), the one optimizer megatie builds.

    On CUDA (``fused`` None: decided by ``fused_applies``) torch's fused kernel: a few launches per
    step instead of several per tensor; its update is elementwise too (tests/test_gpu.py holds
    DeepSpeed to the torch engine on one GPU). Otherwise ``foreach=False``: the per-parameter loop
    gives results independent of how tensors are grouped or flattened, so a regrouped optimizer, an
    uninterrupted one and DeepSpeed's flat partitions agree bit for bit on the CPU."""
    if fused is None:
        fused = fused_applies(p for g in groups for p in g["params"])
    if fused:
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=True)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, foreach=False)


def adam_step_tensor(step: float, master: torch.Tensor, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """An Adam ``step`` entry for state installed by hand (a regroup, a resume), placed as torch places
    its own (``Adam._init_group``): a float32 tensor on the parameter's device for a fused or
    capturable optimizer, whose kernels read and increment it there; a host scalar otherwise."""
    on_device = any(g.get("fused") or g.get("capturable") for g in optimizer.param_groups)
    if on_device:
        return torch.tensor(float(step), dtype=torch.float32, device=master.device)
    return torch.tensor(float(step), dtype=torch.float32)


def adamw_for(model: nn.Module, cfg) -> torch.optim.AdamW:
    """The run's AdamW over the model's unique trainable tensors (settings from ``TrainConfig``)."""
    opt = cfg.optim
    return build_adamw(param_groups(model, opt.weight_decay), opt.lr, (opt.adam_beta1, opt.adam_beta2), opt.adam_eps)


def lr_factor(step: int, cfg) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` (or constant)."""
    if cfg.optim.warmup_steps and step < cfg.optim.warmup_steps:
        return (step + 1) / cfg.optim.warmup_steps
    if cfg.optim.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.optim.warmup_steps) / max(1, cfg.run.max_steps - cfg.optim.warmup_steps))
    return cfg.optim.min_lr_ratio + (1 - cfg.optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_scheduler(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))


def apply_optim_settings(optimizer: torch.optim.Optimizer, scheduler, cfg) -> None:
    """Make a restored optimizer and schedule follow this run's settings. ``load_state_dict`` brings back
    the checkpoint's lr, betas, eps and weight decay with the moments; a resume that was allowed to change
    them (``--allow-changed lr``) must train with the new ones from its first step on."""
    opt = cfg.optim
    for index, group in enumerate(optimizer.param_groups):
        group["weight_decay"] = opt.weight_decay if index == 0 else 0.0  # the order of param_groups
        group["betas"], group["eps"], group["initial_lr"] = (opt.adam_beta1, opt.adam_beta2), opt.adam_eps, opt.lr
        group["lr"] = opt.lr * lr_factor(scheduler.last_epoch, cfg)  # what LambdaLR itself computes
    scheduler.base_lrs = [opt.lr] * len(optimizer.param_groups)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def state_bytes(state: dict) -> int:
    """Bytes of the tensors in an optimizer's per-parameter state."""
    return sum(v.numel() * v.element_size() for st in state.values() for v in st.values()
               if isinstance(v, torch.Tensor))


def clone_state(state: dict) -> dict:
    """Deep copy of one parameter's optimizer state (tensors copied, scalars kept)."""
    out = {}
    tensors = [(k, v) for k, v in state.items() if isinstance(v, torch.Tensor)]
    copies = [torch.empty_like(v) for _, v in tensors]
    multi_tensor_copy_(copies, [v for _, v in tensors])
    out.update({k: c for (k, _), c in zip(tensors, copies)})
    out.update({k: v for k, v in state.items() if not isinstance(v, torch.Tensor)})
    return out


def regroup_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, plan: RegroupPlan) -> None:
    """Make ``optimizer`` track the model's current unique trainable tensors after ``plan``."""
    if not plan.changes_parameters:
        return
    old_state = optimizer.state
    new_state: dict = defaultdict(dict)
    sources = {id(p): src for p, src in plan.created}
    for group in optimizer.param_groups:
        group["params"] = []
    for p in unique_parameters(model, trainable_only=True):
        optimizer.param_groups[min(decay_group(p), len(optimizer.param_groups) - 1)]["params"].append(p)
        if id(p) in sources:
            src = sources[id(p)]
            if src is not None and src in old_state and old_state[src]:
                new_state[p] = clone_state(old_state[src])
        elif p in old_state:
            new_state[p] = old_state[p]
    optimizer.state = new_state
