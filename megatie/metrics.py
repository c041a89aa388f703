"""Run logging: one JSON object per line in ``metrics.jsonl`` and the same scalars in TensorBoard.

Only rank 0 writes. Lines are flushed as they are written so a crashed run keeps its log; a
resumed run appends to the same file after cutting it back to the checkpoint's step
(``megatie.resume.truncate_metrics``), and TensorBoard purges its events after that step too.
Everything written is strict JSON: a non-finite number is written as ``null``.
"""

from __future__ import annotations

import json
import math
import os
import time


def finite_or_none(value):
    """``value`` with every non-finite float (NaN, inf) replaced by None, recursively: JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


class MetricsLogger:
    def __init__(self, out_dir: str, enabled: bool = True, tensorboard: bool = True, resumed_step: int | None = None):
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        self._file = open(os.path.join(out_dir, "metrics.jsonl"), "a", encoding="utf-8")
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


def write_json_atomic(path: str, obj) -> None:
    """Write JSON next to ``path`` and rename it into place, so a reader never sees half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(finite_or_none(obj), f, indent=2, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
