"""The step pipeline a GPU needs, checked on the CPU: losses stay on the device until the run reads them
(once per log line, evaluation, decision or checkpoint - never every step), and the next step's inputs
are made ahead on a worker thread without changing which inputs a step gets or what a checkpoint records."""

from __future__ import annotations

import math

import pytest
import torch

from megatie.config import TrainConfig
from megatie.data.loader import SplitTokens, TokenBatchLoader
from megatie.data.prefetch import StepPrefetcher
from megatie.errors import DataError, DivergedError
from megatie.models.objectives import input_generator
from megatie.metrics.step_losses import PendingLosses
from megatie.trainer import Trainer


def config(out_dir, cache_dir, **overrides):
    base = dict(out_dir=str(out_dir), cache_dir=cache_dir, n_layer=4, n_embd=32, n_head=2, seq_len=16,
                batch_size=2, vocab_size=512, max_steps=12, tie_every=6, eval_every=12, eval_batches=1,
                checkpoint_every=12, log_every=4, progress=False, seed=3)
    base.update(overrides)
    return TrainConfig.from_flat(base)


# --------------------------------------------------------------------------- losses read in windows
def test_pending_losses_read_in_order_once_and_empty():
    pending = PendingLosses()
    pending.add(1, torch.tensor(2.5))
    pending.add(2, torch.tensor([1.25]))  # any one-element tensor
    pending.add(3, 0.5)                    # an engine that already read its loss
    assert len(pending) == 3
    assert [(x.step, x.value) for x in pending.read()] == [(1, 2.5), (2, 1.25), (3, 0.5)]
    assert len(pending) == 0 and pending.read() == []


def test_first_diverged_ignores_steps_a_loss_scaler_skipped():
    pending = PendingLosses()
    for step, value, skipped in [(1, 1.0, False), (2, math.inf, True), (3, math.nan, False), (4, math.nan, False)]:
        pending.add(step, torch.tensor(value), skipped)
    assert PendingLosses.first_diverged(pending.read()).step == 3
    pending.add(5, torch.tensor(math.nan), True)
    assert PendingLosses.first_diverged(pending.read()) is None


def count_reads(trainer) -> list[int]:
    """The steps at which the trainer read its parked losses."""
    steps, read = [], trainer.pending_losses.read

    def counted():
        steps.append(trainer.step)
        return read()
    trainer.pending_losses.read = counted
    return steps


def test_losses_are_read_only_when_the_run_needs_them(tmp_path, cache_dir):
    """Logs every 4 steps, a decision every 6, evaluation and a checkpoint at 12: eight of twelve steps
    queue on without waiting for their loss."""
    trainer = Trainer(config(tmp_path / "run", cache_dir, tie_policy="qlearning", max_steps=12))
    reads = count_reads(trainer)
    trainer.train()
    assert reads == [4, 6, 8, 12]


def test_logged_loss_is_the_loss_of_its_own_step(tmp_path, cache_dir):
    trainer = Trainer(config(tmp_path / "run", cache_dir, max_steps=8))
    seen = []
    step = trainer.engine.train_step
    trainer.engine.train_step = lambda batches: seen.append(float(v := step(batches))) or v
    logged = []
    log = trainer.logger.log
    trainer.logger.log = lambda row, *a, **k: (logged.append(row) if row.get("event") == "train" else None,
                                               log(row, *a, **k))[1]
    trainer.train()
    assert [(r["step"], r["loss"]) for r in logged] == [(4, seen[3]), (8, seen[7])]


def test_divergence_between_reads_is_named_by_its_step_and_nothing_is_saved(tmp_path, cache_dir):
    # a fixed tie map: no decision reads the losses between steps 1 and 8
    trainer = Trainer(config(tmp_path / "run", cache_dir, max_steps=12, log_every=8, checkpoint_every=8,
                             tie_policy="alternate"))
    step = trainer.engine.train_step

    def poisoned(batches):
        loss = step(batches)
        if trainer.step + 1 == 3:  # the weights go bad during step 3; step 4's loss is the first nan
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(float("nan"))
        return loss
    trainer.engine.train_step = poisoned
    with pytest.raises(DivergedError, match="the loss is nan at step 4;"):
        trainer.train()
    assert trainer.step == 8 and not (tmp_path / "run" / "checkpoints").exists()


# --------------------------------------------------------------------------- inputs made ahead
def loader(micro_batch=2, vocab_size=None):
    tokens = torch.arange(4000, dtype=torch.int64).numpy() % 50
    return TokenBatchLoader(SplitTokens("train", [tokens], seq_len=8, vocab_size=vocab_size), micro_batch, seed=5)


def masked(raw, step, micro):
    """Inputs that depend on the step, as masks and augmentation do."""
    noise = torch.randint(0, 1000, raw.shape, generator=input_generator(step, micro))
    return {"input_ids": raw, "labels": raw + noise}


def test_prefetched_inputs_are_the_inputs_each_step_would_make():
    reference, ahead = loader(), loader()
    prefetcher = StepPrefetcher(ahead, masked, micro_batches=3)
    try:
        for step in range(40):  # several epochs of this small split
            expected = [masked(next(reference), step, micro) for micro in range(3)]
            got = prefetcher.take(step)
            assert all(torch.equal(g[k], e[k]) for g, e in zip(got, expected) for k in e)
            assert ahead.state_dict() == reference.state_dict()  # the read-ahead moved nothing
        assert prefetcher.hits == 39 and prefetcher.misses == 1
    finally:
        prefetcher.close()


def test_a_moved_position_is_never_served_a_stale_read_ahead():
    """Resuming sets the loader's position; what was read ahead for the old one is dropped."""
    ahead = loader()
    prefetcher = StepPrefetcher(ahead, masked, micro_batches=1)
    try:
        prefetcher.take(0)
        ahead.load_state_dict({"consumed_samples": 10, "seed": 5})
        got = prefetcher.take(1)
        assert torch.equal(got[0]["input_ids"], ahead.batch_at(10)) and prefetcher.misses == 2
        assert ahead.consumed_samples == 12
    finally:
        prefetcher.close()


def test_an_error_made_ahead_surfaces_at_its_step():
    def make(raw, step, micro):
        if step == 1:
            raise DataError("shard 3 is damaged")
        return {"input_ids": raw}
    prefetcher = StepPrefetcher(loader(), make, micro_batches=1)
    try:
        prefetcher.take(0)  # step 1's inputs fail on the worker ...
        with pytest.raises(DataError, match="shard 3 is damaged"):
            prefetcher.take(1)  # ... and the error is raised where step 1 asks for them
    finally:
        prefetcher.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs a CUDA device")
def test_inputs_for_a_gpu_are_page_locked():
    prefetcher = StepPrefetcher(loader(), masked, micro_batches=2, pin=True)
    try:
        prefetcher.take(0)
        assert all(v.is_pinned() for batch in prefetcher.take(1) for v in batch.values())
    finally:
        prefetcher.close()
