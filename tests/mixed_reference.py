"""A plain-PyTorch oracle for DeepSpeed's mixed-precision ZeRO step on one rank, regroups included.

The model computes in bf16 or fp16; every trainable tensor has an fp32 master that takes the AdamW
step (``megatie.engines.optim``'s, per tensor) on the fp32 copy of its gradient, unscaled by a static fp16
loss scale (a power of two, so unscaling is exact); the weights are the masters rounded back. A
regroup keeps survivors' masters and Adam state, gives an untied tensor a copy of its source's
master and state, and starts a tensor that leaves the frozen phase from its weights with no state -
what the DeepSpeed engine must do. With gradient clipping off, DeepSpeed's ZeRO-1/2 arithmetic on
one rank is this arithmetic, element for element.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from megatie.engines.optim import build_adamw, clone_state, decay_group, lr_scheduler
from megatie.tying.layers import unique_parameters


class MixedPrecisionReference:
    def __init__(self, model, cfg, dtype: torch.dtype, loss_scale: float = 1.0):
        if cfg.optim.grad_clip > 0 or cfg.optim.grad_accum != 1:
            raise ValueError("the oracle follows DeepSpeed without clipping and with one micro-batch per step")
        self.model, self.cfg, self.scale = model.to(dtype), cfg, loss_scale
        self.masters = {id(p): p.detach().float().clone() for p in self._trainable()}
        self.optimizer = build_adamw(self._groups(), cfg.optim.lr, (cfg.optim.adam_beta1, cfg.optim.adam_beta2), cfg.optim.adam_eps)
        self.scheduler = lr_scheduler(self.optimizer, cfg)
        self.regroups = 0

    def _trainable(self):
        return unique_parameters(self.model, trainable_only=True)

    def _groups(self) -> list[dict]:
        groups = [{"params": [], "weight_decay": self.cfg.optim.weight_decay}, {"params": [], "weight_decay": 0.0}]
        for p in self._trainable():
            groups[decay_group(p)]["params"].append(self.masters[id(p)])
        return [g for g in groups if g["params"]]

    def train_step(self, micro_batches) -> float:
        (inputs,) = micro_batches
        self.model.train()
        loss = self.model(**inputs).loss
        (loss * self.scale).backward()
        params = self._trainable()
        for p in params:
            self.masters[id(p)].grad = p.grad.float() / self.scale
            p.grad = None
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            for p in params:
                p.copy_(self.masters[id(p)])
                self.masters[id(p)].grad = None
        return float(loss.detach())

    def step_skipped(self) -> bool:
        return False  # the reference applies every step (its losses are compared only when all are finite)

    def regroup(self, plan) -> dict:
        if not plan.changes_parameters:
            return {}
        created = {id(p): src for p, src in plan.created}
        old_masters, old_state = self.masters, self.optimizer.state
        self.masters, state = {}, {}
        for p in self._trainable():
            src = created.get(id(p), p)
            if src is None:  # leaves the frozen phase: master from its weights, no state
                self.masters[id(p)] = p.detach().float().clone()
                continue
            master = old_masters[id(src)]
            self.masters[id(p)] = master if src is p else master.clone()
            if old_state.get(master):
                state[self.masters[id(p)]] = old_state[master] if src is p else clone_state(old_state[master])
        for group, fresh in zip(self.optimizer.param_groups, self._groups()):
            group["params"] = fresh["params"]
        self.optimizer.state = defaultdict(dict, state)
        self.regroups += 1
        return {}

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def optimizer_state_bytes(self) -> int:
        return 0
