"""Run logging: one JSON object per line in ``metrics.jsonl`` and the same scalars in TensorBoard.

Only rank 0 writes. Lines are flushed as they are written so a crashed run keeps its log, and a
resumed run appends to the same file.
"""

from __future__ import annotations

import json
import math
import os
import time


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    def __init__(self, out_dir: str, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        self._file = open(os.path.join(out_dir, "metrics.jsonl"), "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))

    def log(self, row: dict, step: int, prefix: str = "") -> None:
        if not self.enabled:
            return
        row = {"time": round(time.time(), 3), **{k: _jsonable(v) for k, v in row.items()}}
        self._file.write(json.dumps(row) + "\n")
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
        json.dump(obj, f, indent=2, default=_jsonable)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
