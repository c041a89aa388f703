"""Training losses kept where they were computed until the run needs to read them.

``float(loss)`` after every step makes the host wait for the GPU to finish that step, so the next
step's kernels cannot be queued behind it. The engines return the loss as a 0-dim tensor; the
trainer parks it here and reads all parked losses in one transfer only when something depends on
them: a log line, an evaluation, a tying decision, a checkpoint, the end of the run. Nothing is
saved and no structure changes between two reads, so a diverged step is still caught before
anything diverged is saved, and named by its own step number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class StepLoss:
    step: int
    value: float
    skipped: bool  # fp16's loss scaler skipped this step (its non-finite loss is expected)


class PendingLosses:
    def __init__(self):
        self._steps: list[int] = []
        self._losses: list[torch.Tensor] = []
        self._skipped: list[bool] = []

    def __len__(self) -> int:
        return len(self._steps)

    def add(self, step: int, loss, skipped: bool = False) -> None:
        """Park ``step``'s loss (a tensor, or a float from an engine that already read it)."""
        loss = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        self._steps.append(step)
        self._losses.append(loss.reshape(()).to(torch.float64))
        self._skipped.append(bool(skipped))

    def read(self) -> list[StepLoss]:
        """Every parked loss, oldest first, in one device-to-host transfer; empties the window."""
        if not self._steps:
            return []
        values = torch.stack(self._losses).cpu().tolist()
        out = [StepLoss(s, v, k) for s, v, k in zip(self._steps, values, self._skipped)]
        self._steps, self._losses, self._skipped = [], [], []
        return out

    @staticmethod
    def first_diverged(losses: list[StepLoss]) -> StepLoss | None:
        """The first non-finite loss that no loss scaler accounted for."""
        return next((x for x in losses if not math.isfinite(x.value) and not x.skipped), None)
