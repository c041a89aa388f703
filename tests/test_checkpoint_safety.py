"""Checkpoints a user can trust after a crash: no code runs from one, damaged bytes are refused
(``--resume auto`` falls back to the newest that verifies), one timeline per run directory,
changed settings refused unless allowed, a diverged model is never saved."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from megatie.checkpoint.store import file_record, list_checkpoints, prune_checkpoints
from megatie.config import TrainConfig
from megatie.errors import CheckpointError, ConfigError, DivergedError
from megatie.trainer import Trainer

MARKER = "payload-ran"


def config(out_dir, cache_dir, **overrides):
    base = dict(out_dir=str(out_dir), cache_dir=cache_dir, n_layer=4, n_embd=32, n_head=2, seq_len=32,
                batch_size=4, vocab_size=512, max_steps=12, tie_every=4, eval_every=4, eval_batches=2,
                checkpoint_every=4, keep_checkpoints=5, log_every=1, progress=False, seed=7)
    base.update(overrides)
    return TrainConfig.from_flat(base)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache_dir):
    """A 12-step run with checkpoints at steps 4, 8, 12 (copied by each test that changes it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    Trainer(config(out, cache_dir)).train()
    return out


def copy_run(run, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def reseal(ckpt, fname):
    """Update meta.json for a changed file, as an attacker who knows the format would."""
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"][fname] = file_record(str(ckpt / fname))
    (ckpt / "meta.json").write_text(json.dumps(meta))


class Payload:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def strict_json(path):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.mark.parametrize("fname", ["trainer.pt", "optimizer.pt", "model.safetensors"])
def test_a_planted_pickle_never_runs(finished_run, tmp_path, cache_dir, fname):
    run = copy_run(finished_run, tmp_path)
    ckpt = run / "checkpoints" / "step_00000012"
    marker = tmp_path / MARKER
    torch.save({"step": Payload(str(marker))}, ckpt / fname)
    # The payload is live: an unprotected load runs it.
    shutil.copy(ckpt / fname, tmp_path / "payload.pt")
    torch.load(tmp_path / "payload.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()
    reseal(ckpt, fname)  # sizes and hashes match: only the loader stands in the way
    with pytest.raises(CheckpointError, match="refused|not a|corrupt"):
        Trainer(config(run, cache_dir, resume=str(ckpt), max_steps=16, allow_changed=["max_steps"]))
    assert not marker.exists()


def test_changed_bytes_are_refused_and_auto_falls_back(finished_run, tmp_path, cache_dir):
    run = copy_run(finished_run, tmp_path)
    newest = run / "checkpoints" / "step_00000012"
    with open(newest / "model.safetensors", "r+b") as f:  # 4 KiB overwritten, same size
        f.seek(os.path.getsize(newest / "model.safetensors") // 2)
        f.write(b"\x7f" * 4096)
    with pytest.raises(CheckpointError, match="fails its SHA-256 check"):
        Trainer(config(run, cache_dir, resume=str(newest)))
    resumed = Trainer(config(run, cache_dir, resume="auto", max_steps=16, allow_changed=["max_steps"]))
    assert resumed.step == 8  # the newest checkpoint that verifies
    assert (run / "checkpoints" / "damaged-step_00000012").is_dir()  # set aside, not deleted
    resumed.train()
    train_steps = [r["step"] for r in map(json.loads, open(run / "metrics.jsonl")) if r["event"] == "train"]
    assert train_steps == list(range(1, 17))  # rows 9-12 of the old timeline are gone, none twice
    event = [r for r in map(json.loads, open(run / "metrics.jsonl")) if r["event"] == "resume"][0]
    assert event["skipped"] == ["step_00000012"] and event["overrides"] == {"max_steps": [12, 16]}
    strict_json(run / "summary.json")


def test_one_timeline_per_run_directory(finished_run, tmp_path, cache_dir):
    run = copy_run(finished_run, tmp_path)
    older = run / "checkpoints" / "step_00000004"
    with pytest.raises(CheckpointError, match="already holds step_00000012"):
        Trainer(config(run, cache_dir, resume=str(older)))
    branch = Trainer(config(tmp_path / "branch", cache_dir, resume=str(older)))  # a new directory: a branch
    assert branch.step == 4
    assert sorted(os.listdir(run / "checkpoints")) == sorted(os.listdir(finished_run / "checkpoints"))


def test_changed_settings_are_refused_unless_allowed(finished_run, tmp_path, cache_dir):
    run = copy_run(finished_run, tmp_path)
    with pytest.raises(CheckpointError, match=r"\(lr 0.0006 -> 0.002\).*--allow-changed lr$"):
        Trainer(config(run, cache_dir, resume="auto", lr=2e-3, max_steps=16, allow_changed=["max_steps"]))
    with pytest.raises(CheckpointError, match="--allow-changed batch_size"):
        Trainer(config(run, cache_dir, resume="auto", batch_size=2, max_steps=16, allow_changed=["max_steps"]))
    with pytest.raises(CheckpointError, match="n_layer"):  # structure: never
        Trainer(config(run, cache_dir, resume="auto", n_layer=6, max_steps=16, allow_changed=["n_layer", "max_steps"]))
    with pytest.raises(ConfigError, match="nothing left to train"):
        Trainer(config(run, cache_dir, resume="auto"))
    with pytest.raises(ConfigError, match="unknown setting"):
        Trainer(config(run, cache_dir, resume="auto", max_steps=16, allow_changed=["max_step"]))
    t = Trainer(config(run, cache_dir, resume="auto", lr=2e-3, max_steps=16, allow_changed=["lr", "max_steps"]))
    assert t.step == 12 and t.cfg.optim.lr == 2e-3
    assert json.loads((run / "config.json").read_text())["allow_changed"] == ["lr", "max_steps"]


def poison_after(trainer, step):
    """Make the weights non-finite after optimizer step ``step`` (as a diverging run would)."""
    train_step = trainer.engine.train_step

    def wrapped(batches):
        loss = train_step(batches)
        if trainer.step + 1 == step:
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(float("nan"))
        return loss
    trainer.engine.train_step = wrapped


@pytest.mark.parametrize("poisoned,match", [(6, "the loss is nan at step 7"), (8, "holds non-finite values at step 8")])
def test_divergence_stops_before_anything_is_saved(finished_run, tmp_path, cache_dir, poisoned, match):
    run = copy_run(finished_run, tmp_path)
    before = {p: p.read_bytes() for p in (run / "summary.json", run / "checkpoints" / "best" / "meta.json")}
    shutil.rmtree(run / "checkpoints" / "step_00000008")
    shutil.rmtree(run / "checkpoints" / "step_00000012")
    trainer = Trainer(config(run, cache_dir, resume="auto", max_steps=12))
    poison_after(trainer, poisoned)
    with pytest.raises(DivergedError, match=match):
        trainer.train()
    assert [os.path.basename(p) for p in list_checkpoints(str(run / "checkpoints"))] == ["step_00000004"]
    assert all(p.read_bytes() == b for p, b in before.items())  # best and summary.json untouched


def test_checkpoints_are_ordered_and_pruned_by_step(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (99999998, 99999999, 100000000, 100000001):  # 8 digits, then 9: names no longer sort
        (root / f"step_{step:08d}").mkdir(parents=True)
        (root / f"step_{step:08d}" / "meta.json").write_text("{}")
    assert [os.path.basename(p) for p in list_checkpoints(str(root))][-1] == "step_100000001"
    prune_checkpoints(str(root), keep=2)
    assert sorted(os.listdir(root)) == ["step_100000000", "step_100000001"]


def test_summary_is_strict_json(finished_run):
    summary = strict_json(finished_run / "summary.json")
    assert summary["steps"] == 12
    for line in open(finished_run / "metrics.jsonl"):
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


def test_resume_auto_alone_continues_the_run_as_it_was(finished_run, tmp_path, cache_dir):
    """Only the flags given are changes: sizes, seed, policy, lr... come from the checkpoint."""
    from megatie.tools.train_cli import run_main, train_main

    run = copy_run(finished_run, tmp_path)
    assert run_main(train_main, ["--out-dir", str(run), "--resume", "auto", "--max-steps", "14", "--allow-changed",
                                 "max_steps", "--no-progress", "--cache-dir", cache_dir]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert (saved["n_layer"], saved["n_embd"], saved["seed"], saved["max_steps"], saved["warmup_steps"]) == (4, 32, 7, 14, 1)
    assert strict_json(run / "summary.json")["steps"] == 14
    assert run_main(train_main, ["--out-dir", str(run), "--resume", "auto", "--seed", "8", "--max-steps", "16",
                                 "--allow-changed", "max_steps", "--no-progress", "--cache-dir", cache_dir]) == 2


def test_every_damaged_byte_range_is_refused(finished_run, tmp_path, cache_dir):
    """16 bytes changed at 8 places in every file of a checkpoint, one place at a time: all refused."""
    import random

    run = copy_run(finished_run, tmp_path)
    ckpt = run / "checkpoints" / "step_00000012"
    rng, refused, tried = random.Random(0), 0, 0
    for fname in sorted(json.loads((ckpt / "meta.json").read_text())["files"]):
        pristine = (ckpt / fname).read_bytes()
        for _ in range(8):
            at = rng.randrange(0, len(pristine) - 16)
            damaged = bytearray(pristine)
            damaged[at:at + 16] = bytes((b ^ 0x5A) for b in damaged[at:at + 16])
            (ckpt / fname).write_bytes(bytes(damaged))
            tried += 1
            with pytest.raises(CheckpointError, match="fails its SHA-256 check"):
                Trainer(config(run, cache_dir, resume=str(ckpt), max_steps=16, allow_changed=["max_steps"]))
            refused += 1
        (ckpt / fname).write_bytes(pristine)
    assert refused == tried == 8 * 3
