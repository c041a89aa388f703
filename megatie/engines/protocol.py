"""What the trainer needs from an optimisation engine, as a type both engines implement.

An engine owns the optimizer (and, for DeepSpeed, the distributed engine around the model) and turns a
step's micro-batches into an update. The trainer, the tests and the benchmarks use engines only through
this interface; ``tests/test_engines.py`` checks that both engines satisfy it.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Engine(Protocol):
    # How many regroups changed the optimizer's parameters so far.
    regroups: int

    def train_step(self, micro_batches: list[dict]) -> torch.Tensor:
        """One optimizer step over ``micro_batches`` (the model's inputs, labels included); the mean loss
        as a 0-dim tensor on the device, unread, so the caller decides when to wait for it."""
        ...

    def step_skipped(self) -> bool:
        """Whether the last step was skipped by a loss scaler (an fp16 overflow)."""
        ...

    def regroup(self, plan) -> dict:
        """Carry the optimizer through a change of tie groups (``megatie.tying.layers.RegroupPlan``): the
        record a decision logs (``regroup_seconds``, ``regroup_transient_bytes``, ...), empty when the
        plan changes no parameter."""
        ...

    def optimizer_state_bytes(self) -> int:
        """Bytes of master weights and optimizer moments, over all ranks."""
        ...

    @property
    def lr(self) -> float:
        ...

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps taken (restored on resume): the learning-rate schedule's position."""
        ...

    def state_dict(self) -> dict:
        ...

    def load_state_dict(self, sd: dict) -> None:
        ...

    def save_checkpoint(self, root: str, name: str, step: int, trainer_state: dict) -> str:
        """Write a verified checkpoint ``root/name`` atomically; its path."""
        ...
