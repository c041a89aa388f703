"""Sequence views over prepared token splits, and the resumable, rank-sharded train loader."""
from __future__ import annotations

import bisect
from typing import Iterator

import numpy as np
import torch

from megatie.errors import DataError


class SplitTokens:
    """A split as non-overlapping ``seq_len`` sequences over one or more memmap segments.

    Sequence ``i`` is tokens ``[i*seq_len, (i+1)*seq_len)`` of the split's concatenation;
    reads are slices of the memmaps (zero-copy) except where a sequence straddles two
    segments. The tail shorter than a sequence is dropped.
    """

    def __init__(self, name: str, segments: list[np.ndarray], seq_len: int, vocab_size: int | None = None,
                 sources: list[tuple[str, int]] | None = None):
        self.name, self.seq_len, self.vocab_size = name, seq_len, vocab_size
        sources = sources or [("?", 0)] * len(segments)
        self.sources = [src for s, src in zip(segments, sources) if len(s)]
        self.segments = [s for s in segments if len(s)]
        self.starts = np.cumsum([0] + [len(s) for s in self.segments]).tolist()
        self.num_tokens = self.starts[-1]
        self.num_sequences = self.num_tokens // seq_len

    def sequence(self, i: int) -> np.ndarray:
        lo = i * self.seq_len
        hi = lo + self.seq_len
        k = bisect.bisect_right(self.starts, lo) - 1
        seg, base = self.segments[k], self.starts[k]
        if hi <= base + len(seg):
            return seg[lo - base:hi - base]
        parts, pos = [], lo
        while pos < hi:
            k = bisect.bisect_right(self.starts, pos) - 1
            seg, base = self.segments[k], self.starts[k]
            take = min(hi, base + len(seg)) - pos
            parts.append(seg[pos - base:pos - base + take])
            pos += take
        return np.concatenate(parts)

    def batch(self, indices) -> torch.Tensor:
        out = np.empty((len(indices), self.seq_len), dtype=np.int64)
        for row, i in enumerate(indices):
            out[row] = self.sequence(int(i))
        # Every id that reaches the model is checked: one max over the batch, so a corrupt shard ends in
        # one line naming it (below) whatever its size, without a scan of the corpus at start-up.
        if self.vocab_size is not None and len(out) and int(out.max()) >= self.vocab_size:
            self._raise_bad_id(indices, out)
        return torch.from_numpy(out)

    def _raise_bad_id(self, indices, out: np.ndarray) -> None:
        from megatie.data.prepared import check_token_ids

        row = int(np.argmax((out >= self.vocab_size).any(axis=1)))
        pos = int(indices[row]) * self.seq_len + int(np.argmax(out[row] >= self.vocab_size))
        k = bisect.bisect_right(self.starts, pos) - 1
        path, first = self.sources[k]
        at = pos - self.starts[k]
        check_token_ids(path, self.segments[k][at:at + 1], self.vocab_size, first + at)


class TokenBatchLoader:
    """Endless [micro_batch, seq_len] batches of the train split, exactly resumable.

    Each epoch draws a permutation of all sequences from ``(seed, epoch)`` alone; the first
    ``samples_per_epoch * world_size`` entries are split into contiguous, disjoint per-rank
    slices (the remainder is dropped so every rank takes the same number of steps). The
    position is one integer, the rank's consumed-sample count, so a checkpoint restores it
    exactly and nothing depends on iterator state.
    """

    def __init__(self, split: SplitTokens, micro_batch: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}")
        if micro_batch < 1:
            raise DataError(f"micro batch must be positive, got {micro_batch}")
        self.split, self.micro_batch, self.seed = split, micro_batch, int(seed)
        self.rank, self.world_size = rank, world_size
        per_rank = split.num_sequences // world_size
        self.samples_per_epoch = (per_rank // micro_batch) * micro_batch
        if self.samples_per_epoch == 0:
            raise DataError(
                f"the {split.name} split has {split.num_sequences} sequences of {split.seq_len} tokens, "
                f"fewer than micro batch {micro_batch} x world size {world_size}; "
                "use more text, a shorter --seq-len or a smaller batch")
        self.consumed_samples = 0
        self._cached = (-1, None)  # (epoch, this rank's slice): one tuple, replaced whole (a prefetch thread reads it)

    @property
    def epoch(self) -> int:
        return self.consumed_samples // self.samples_per_epoch

    def _slice(self, epoch: int) -> np.ndarray:
        cached_epoch, cached = self._cached
        if cached_epoch == epoch:
            return cached
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.split.num_sequences)
        n = self.samples_per_epoch
        self._cached = (epoch, perm[self.rank * n:(self.rank + 1) * n])
        return self._cached[1]

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's sequence indices for ``epoch``, in order (for tests and inspection)."""
        return self._slice(epoch).copy()

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        batch = self.batch_at(self.consumed_samples)
        self.consumed_samples += self.micro_batch
        return batch

    def batch_at(self, consumed_samples: int) -> torch.Tensor:
        """The micro-batch served after ``consumed_samples``, without moving the position (what a
        prefetch reads ahead; the position, and so a checkpoint, only counts batches taken)."""
        epoch, pos = divmod(consumed_samples, self.samples_per_epoch)
        return self.split.batch(self._slice(epoch)[pos:pos + self.micro_batch])

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "epoch": self.epoch,
                "seed": self.seed, "micro_batch": self.micro_batch, "rank": self.rank,
                "world_size": self.world_size, "samples_per_epoch": self.samples_per_epoch,
                "global_consumed_samples": self.consumed_samples * self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise DataError(f"the checkpoint's data seed {state['seed']} differs from --seed "
                            f"{self.seed}; resume with the original seed")
        if int(state.get("world_size", self.world_size)) == self.world_size and \
                int(state.get("samples_per_epoch", self.samples_per_epoch)) == self.samples_per_epoch:
            self.consumed_samples = int(state["consumed_samples"])
            return
        # Different world size or batch geometry: continue from the same point of the same
        # epoch, measured in samples seen by all ranks together.
        glob = int(state.get("global_consumed_samples", state["consumed_samples"]))
        old_epoch_global = int(state.get("samples_per_epoch", 0)) * int(state.get("world_size", 1))
        epoch, done = divmod(glob, old_epoch_global) if old_epoch_global else (0, glob)
        pos = min(done // self.world_size, self.samples_per_epoch)
        self.consumed_samples = epoch * self.samples_per_epoch + pos


def eval_batches(split: SplitTokens, batch_size: int, max_batches: int | None = None):
    n = split.num_sequences
    if max_batches is not None:
        n = min(n, max_batches * batch_size)
    for lo in range(0, n, batch_size):
        yield split.batch(range(lo, min(n, lo + batch_size)))


def random_batch(split: SplitTokens, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    idx = torch.randint(split.num_sequences, (batch_size,), generator=generator)
    return split.batch(idx.tolist())
