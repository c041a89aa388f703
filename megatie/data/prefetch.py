"""The next step's inputs, made on a worker thread while this step trains.

A GPU step should never wait for the host to gather token rows from the shards, draw masks or
normalise images. ``StepPrefetcher.take(step)`` hands over the inputs of ``step`` and at once starts
making those of ``step + 1``; on a CUDA run they are made in page-locked memory, so the engines'
``non_blocking`` copies overlap the previous step's compute instead of staging through pageable memory.

Exactness is kept by construction: inputs are a pure function of (loader position, step, micro-batch)
- ``TokenBatchLoader.batch_at`` reads without moving the position, and masks/augmentation are seeded
by the step - and the loader's position only advances in ``take``. A checkpoint therefore records the
batches consumed, never the one read ahead, and a resumed run (or one whose position was changed
under the prefetcher) recomputes rather than trusting a stale read-ahead.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch

from megatie.data.loader import TokenBatchLoader

MakeInputs = Callable[[torch.Tensor, int, int], dict]  # (raw batch, step, micro-batch) -> model inputs


class StepPrefetcher:
    def __init__(self, loader: TokenBatchLoader, make_inputs: MakeInputs, micro_batches: int, pin: bool = False):
        self.loader, self.make_inputs = loader, make_inputs
        self.micro_batches, self.pin = micro_batches, pin
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="megatie-prefetch")
        self._ahead: tuple[tuple[int, int], Future] | None = None  # ((position, step), inputs being made)
        self.hits = self.misses = 0

    def _make(self, position: int, step: int) -> list[dict]:
        batches = []
        for micro in range(self.micro_batches):
            raw = self.loader.batch_at(position + micro * self.loader.micro_batch)
            inputs = self.make_inputs(raw, step, micro)
            batches.append({k: v.pin_memory() for k, v in inputs.items()} if self.pin else inputs)
        return batches

    def take(self, step: int, read_ahead: bool = True) -> list[dict]:
        """The inputs of optimizer step ``step`` (all its micro-batches); moves the loader past them."""
        key = (self.loader.consumed_samples, step)
        if self._ahead is not None and self._ahead[0] == key:
            batches = self._ahead[1].result()  # re-raises what the worker raised (a corrupt shard, say)
            self.hits += 1
        else:
            self._discard()
            batches = self._make(*key)
            self.misses += 1
        self._ahead = None
        self.loader.consumed_samples += self.micro_batches * self.loader.micro_batch
        if read_ahead:
            position = self.loader.consumed_samples
            self._ahead = ((position, step + 1), self._pool.submit(self._make, position, step + 1))
        return batches

    def _discard(self) -> None:
        if self._ahead is not None:
            self._ahead[1].cancel()
            self._ahead = None

    def close(self) -> None:
        """Stop the worker; a read-ahead in flight is finished and dropped (it moved nothing)."""
        self._discard()
        self._pool.shutdown(wait=True, cancel_futures=True)
