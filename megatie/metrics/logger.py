"""Run logging: one JSON object per line in ``metrics.jsonl`` and the same scalars in TensorBoard.

Only rank 0 writes. Lines are flushed as they are written so a crashed run keeps its log; a
resumed run appends to the same file after cutting it back to the checkpoint's step
(``megatie.checkpoint.resume.truncate_metrics``), and TensorBoard purges its events after that step too.
Everything written is strict JSON: a non-finite number is written as ``null``.
"""

from __future__ import annotations

import json
import math
import os
import time

from megatie.errors import ConfigError
from megatie.runtime.atomic import finite_or_none


class MetricsLogger:
    def __init__(self, out_dir: str, enabled: bool = True, tensorboard: bool = True, resumed_step: int | None = None):
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        for name in ("metrics.jsonl", "tensorboard"):
            if os.path.islink(os.path.join(out_dir, name)):  # it would append to a file outside the run
                raise ConfigError(f"{os.path.join(out_dir, name)} is a symbolic link; a run writes its logs only "
                                  "inside its out-dir: remove the link")
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        self._file = os.fdopen(os.open(os.path.join(out_dir, "metrics.jsonl"), flags, 0o644), "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # After a crash, events past the checkpoint's step are dropped, as metrics.jsonl rows are.
            purge = None if resumed_step is None else resumed_step + 1
            self._tb = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=purge)

    def log(self, row: dict, step: int, prefix: str = "") -> None:
        if not self.enabled:
            return
        row = {"time": round(time.time(), 3), **finite_or_none(row)}
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key in ("time", "step") or isinstance(value, bool):
                    continue
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{prefix}{key}", value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
