"""What makes preparation resumable: shard files that can be reopened, and a journal of finished work.

Preparation writes into a staging directory. After each finished piece of text (a *task*, a few MB,
always cut the same way for the same input) the shard being written is flushed to disk and the
journal, ``progress.json``, is replaced atomically: which streams are complete, and for the one in
progress how many tasks are done and how many tokens each of its shards holds. After a ``kill -9``
the next run with the same request reopens the staging directory, cuts the open shard back to the
length the journal records (bytes past it came from work the journal never confirmed), removes
shards the journal does not know, and continues with the next task. Results are written in task
order, so the shards come out byte-identical to an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

JOURNAL = "progress.json"
JOURNAL_EVERY_S = 1.0    # at most this often: each entry costs an fsync of the open shard


class ShardWriter:
    """Appends token arrays to numbered shard files ``<stream>-NNNNN.bin``, rolling over at
    ``shard_tokens``; ``shards`` (from a journal) reopens a stream where the journal left it."""

    def __init__(self, root: Path, stream: str, dtype: np.dtype, shard_tokens: int,
                 shards: list[dict] | None = None):
        self.root, self.stream, self.dtype, self.cap = Path(root), stream, np.dtype(dtype), shard_tokens
        self.shards = [dict(s) for s in shards or []]
        self.f = None
        self.n = self.shards[-1]["num_tokens"] if self.shards else 0
        self._drop_unconfirmed()
        if self.shards:
            self.f = open(self.root / self.shards[-1]["file"], "r+b")
            self.f.truncate(self.n * self.dtype.itemsize)
            self.f.seek(0, os.SEEK_END)

    def _drop_unconfirmed(self) -> None:
        known = {s["file"] for s in self.shards}
        for path in self.root.glob(f"{self.stream}-*.bin"):
            if path.name not in known:
                path.unlink()

    def _open(self) -> None:
        name = f"{self.stream}-{len(self.shards):05d}.bin"
        self.f = open(self.root / name, "wb")
        self.shards.append({"file": name, "stream": self.stream, "num_tokens": 0})
        self.n = 0

    def write(self, arr: np.ndarray) -> None:
        while arr.size:
            if self.f is None or self.n >= self.cap:
                self._close()
                self._open()
            take = min(arr.size, self.cap - self.n)
            self.f.write(arr[:take].tobytes())
            self.n += take
            self.shards[-1]["num_tokens"] = self.n
            arr = arr[take:]

    def sync(self) -> None:
        """Everything written so far is on disk (the journal may now point past it)."""
        if self.f is not None:
            self.f.flush()
            os.fsync(self.f.fileno())

    def _close(self) -> None:
        if self.f is not None:
            self.sync()
            self.f.close()
            self.f = None

    def close(self) -> list[dict]:
        self._close()
        for s in self.shards:
            s["bytes"] = s["num_tokens"] * self.dtype.itemsize
        return self.shards


class Journal:
    """The staging directory's record of finished work, for one request key."""

    def __init__(self, stage: Path, key: str):
        self.path, self.key = Path(stage) / JOURNAL, key
        self.data = {"request_key": key, "tokenizer": None, "done": {}, "done_bytes": {}, "current": None}
        self._last = 0.0

    def load(self) -> bool:
        """Adopt the journal on disk if it belongs to this request; False when there is nothing to resume."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return False
        if not isinstance(data, dict) or data.get("request_key") != self.key:
            return False
        self.data = data
        return True

    @property
    def tokenizer(self) -> dict | None:
        return self.data["tokenizer"]

    def position(self, stream: str) -> tuple[int, int, list[dict]]:
        """``(tasks done, text bytes done, shards)`` of ``stream`` as last recorded."""
        cur = self.data["current"]
        if cur and cur["stream"] == stream:
            return cur["tasks"], cur["bytes"], cur["shards"]
        return 0, 0, []

    def finished(self, stream: str) -> list[dict] | None:
        return self.data["done"].get(stream)

    def bytes_done(self) -> int:
        cur = self.data["current"]
        return sum(self.data["done_bytes"].values()) + (cur["bytes"] if cur else 0)

    def record_tokenizer(self, tok_meta: dict) -> None:
        self.data["tokenizer"] = tok_meta
        self._write()

    def record_task(self, stream: str, tasks: int, text_bytes: int, writer: ShardWriter) -> None:
        if time.monotonic() - self._last < JOURNAL_EVERY_S:
            return
        writer.sync()
        self.data["current"] = {"stream": stream, "tasks": tasks, "bytes": text_bytes,
                                "shards": [dict(s) for s in writer.shards]}
        self._write()

    def record_stream(self, stream: str, shards: list[dict], text_bytes: int) -> None:
        self.data["done"][stream] = shards
        self.data["done_bytes"][stream] = text_bytes
        self.data["current"] = None
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(self.data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._last = time.monotonic()
