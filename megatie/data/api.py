"""``build_lm_data``: from a source description to ready loaders, preparing on first use."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from megatie.data.loader import (
    SplitTokens,
    TokenBatchLoader,
    eval_batches,
    random_batch,
)
from megatie.data.mlm import MLMCollator
from megatie.data.prepared import open_tokens, read_meta, segment_sources
from megatie.data.shards import prepare, request_key
from megatie.data.sources import make_corpus
from megatie.errors import DataError

DEFAULT_CACHE = "~/.cache/megatie"


class LMData:
    """Prepared token splits plus their tokenizer, cut into ``seq_len`` sequences."""

    def __init__(self, path: Path, seq_len: int, mlm: bool = False, required=None):
        self.path = Path(path)
        self.meta, self.tokenizer, segments = open_tokens(path)
        self.seq_len, self.mlm = int(seq_len), mlm
        self.vocab_size = int(self.meta["vocab_size"])
        sources = segment_sources(self.meta, self.path)
        self._splits = {n: SplitTokens(n, segs, self.seq_len, self.vocab_size, sources[n])
                        for n, segs in segments.items()}
        required = required or self.meta.get("required_splits", ["train", "valid"])
        for name in required:
            n = self._splits[name].num_tokens if name in self._splits else 0
            if n < self.seq_len + 1:
                raise DataError(
                    f"the {name} split has {n} tokens, fewer than one sequence of seq_len+1 = "
                    f"{self.seq_len + 1}; use more text, a shorter --seq-len"
                    + (", or a larger holdout fraction / a --valid-file" if name == "valid" else ""))
        # Splits too short for a single sequence (e.g. an optional test split) are not offered.
        self.splits = [n for n in ("train", "valid", "test") if n in self._splits
                       and self._splits[n].num_sequences > 0]
        if mlm and self.tokenizer.mask_id is None:
            raise DataError("masked-LM training needs a tokenizer with a mask token; "
                            "use --tokenizer sentencepiece")

    def _split(self, split: str) -> SplitTokens:
        if split not in self.splits:
            raise DataError(f"no {split!r} split in {self.path}; available: {', '.join(self.splits)}")
        return self._splits[split]

    def num_tokens(self, split: str) -> int:
        return self._split(split).num_tokens

    def num_sequences(self, split: str) -> int:
        return self._split(split).num_sequences

    def train_loader(self, micro_batch: int, seed: int, rank: int = 0,
                     world_size: int = 1) -> TokenBatchLoader:
        return TokenBatchLoader(self._split("train"), micro_batch, seed, rank, world_size)

    def random_batch(self, split: str, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return random_batch(self._split(split), batch_size, generator)

    def eval_batches(self, split: str, batch_size: int, max_batches: int | None = None):
        return eval_batches(self._split(split), batch_size, max_batches)

    def mlm_collator(self, mlm_probability: float = 0.15, generator=None) -> MLMCollator:
        return MLMCollator(self.tokenizer, self.vocab_size, mlm_probability, generator=generator)

    def __repr__(self):
        parts = ", ".join(f"{n}={self.num_tokens(n)}" for n in self.splits)
        return f"LMData({self.path}, tokenizer={self.tokenizer.name}, seq_len={self.seq_len}, {parts})"


def _wait_for(path: Path, timeout: float = 6 * 3600):
    # Without a barrier, followers poll for the leader's meta.json (written last, atomically).
    t0 = time.time()
    while read_meta(path) is None:
        if time.time() - t0 > timeout:
            raise DataError(f"timed out waiting for rank 0 to prepare {path}")
        time.sleep(1.0)


def build_lm_data(train_files=None, valid_files=None, dataset=None, dataset_dir=None, tokenizer="sentencepiece",
                  vocab_size=4096, seq_len=128, cache_dir=DEFAULT_CACHE, data_dir=None,
                  holdout_fraction=0.05, rank=0, world_size=1, barrier=None, mlm=False,
                  num_workers=None, log=None, progress=False) -> LMData:
    if int(seq_len) < 1:
        raise DataError(f"seq_len must be positive, got {seq_len}")
    sources_given = bool(train_files or dataset or dataset_dir)
    if data_dir is not None:
        data_dir = Path(os.path.expanduser(str(data_dir)))
        if not sources_given or read_meta(data_dir) is not None:
            if barrier is not None:
                barrier()
            return LMData(data_dir, seq_len, mlm)
        out = data_dir
        corpus = make_corpus(train_files, valid_files, dataset, holdout_fraction, dataset_dir)
    else:
        corpus = make_corpus(train_files, valid_files, dataset, holdout_fraction, dataset_dir)
        _, key = request_key(corpus, tokenizer, vocab_size)
        out = Path(os.path.expanduser(str(cache_dir))) / "prepared" / key
    if rank == 0:
        if read_meta(out) is None:
            prepare(corpus, out, tokenizer=tokenizer, vocab_size=vocab_size, cache_dir=cache_dir,
                    num_workers=num_workers, log=log, wait=True, progress=progress)
        if barrier is not None:
            barrier()
    else:
        if barrier is not None:
            barrier()
        _wait_for(out)
    return LMData(out, seq_len, mlm)
