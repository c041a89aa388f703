"""One process, plain torch AdamW over the unique trainable tensors, regrouped at every decision.

The reference: every other engine is tested against it step for step (``megatie.engines.optim`` holds the
regroup and the schedule it shares with them)."""

from __future__ import annotations

import time

import torch

from megatie.checkpoint.store import save_checkpoint
from megatie.engines.optim import (
    adamw_for,
    apply_optim_settings,
    lr_scheduler,
    regroup_optimizer,
    state_bytes,
)
from megatie.errors import CheckpointError
from megatie.metrics.live_bytes import TransientMeter
from megatie.models.objectives import model_inputs_on
from megatie.tying.layers import unique_parameters


class TorchEngine:
    def __init__(self, model, cfg, device: torch.device, observer=None):
        self.model, self.cfg, self.device, self.observer = model, cfg, device, observer
        self.optimizer = adamw_for(model, cfg)
        self.scheduler = lr_scheduler(self.optimizer, cfg)
        self.regroups = 0

    def train_step(self, micro_batches: list[dict]) -> torch.Tensor:
        """One optimizer step over ``micro_batches``, each the model's inputs (labels included). Returns the
        mean loss as a 0-dim tensor on the device, unread: the caller decides when to wait for it."""
        self.model.train()
        total = torch.zeros((), device=self.device)
        for inputs in micro_batches:
            inputs = model_inputs_on(inputs, self.model, self.device)
            loss = self.model(**inputs).loss / len(micro_batches)
            loss.backward()
            total += loss.detach()
        if self.observer is not None:
            self.observer.after_backward(self)
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(unique_parameters(self.model, trainable_only=True), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def regroup(self, plan) -> dict:
        """Survivors keep their state, untied tensors take a copy of their source's; the copies become
        the new state. ``regroup_transient_bytes`` is measured as the DeepSpeed engine's is."""
        if not plan.changes_parameters:
            return {}
        t0 = time.perf_counter()
        with TransientMeter(self.device, self.model, self.optimizer, plan) as meter:
            regroup_optimizer(self.optimizer, self.model, plan)
        self.regroups += 1
        return {"regroup_seconds": time.perf_counter() - t0, "regroup_transient_bytes": meter.peak_bytes,
                "regroup_transient_source": meter.source, "optimizer_state_bytes": self.optimizer_state_bytes()}

    def optimizer_state_bytes(self) -> int:
        """fp32 masters (here the trainable parameters themselves) plus Adam moments."""
        masters = sum(p.numel() * 4 for p in unique_parameters(self.model, trainable_only=True))
        return masters + state_bytes(self.optimizer.state)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @property
    def optimizer_steps(self) -> int:
        return int(self.scheduler.last_epoch)  # the schedule steps once per optimizer step

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        try:
            self.optimizer.load_state_dict(sd["optimizer"])
            self.scheduler.load_state_dict(sd["scheduler"])
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"optimizer state does not match the model: {e}") from None
        apply_optim_settings(self.optimizer, self.scheduler, self.cfg)

    def step_skipped(self) -> bool:
        """Whether the last step was skipped by a loss scaler (never: this engine has none)."""
        return False

    def save_checkpoint(self, root: str, name: str, step: int, trainer_state: dict) -> str:
        return save_checkpoint(root, name, step, self.model, self.state_dict(), trainer_state)
