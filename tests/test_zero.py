"""DeepSpeed engine, one process (gloo on CPU): equivalence with the torch reference, no leaks,
stages x dtypes, resume, config refusals. The multi-rank checks are in test_zero_distributed.py."""

from __future__ import annotations

import gc
import json
import math
import os
import weakref
from functools import partial

import pytest
import torch

deepspeed = pytest.importorskip("deepspeed")

from megatie.cli import build_parser, config_from_args, init_deepspeed_distributed, run_main, train_main  # noqa: E402
from megatie.errors import CheckpointError, ConfigError  # noqa: E402
from megatie.tying import count_parameters  # noqa: E402
from megatie.trainer import Trainer  # noqa: E402
from megatie.zero import DeepSpeedEngine, load_ds_config  # noqa: E402
from zero_helper import base_args, record_losses, write_reference_run  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZERO2 = {"zero_optimization": {"stage": 2, "overlap_comm": False}}


@pytest.fixture(scope="module", autouse=True)
def dist():
    init_deepspeed_distributed()
    yield


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return write_reference_run(str(tmp_path_factory.mktemp("ref")))


def _trainer(args, ds_config=None, activation_checkpointing=False):
    cfg = config_from_args(build_parser().parse_args(args))
    if ds_config is None:
        return Trainer(cfg)
    return Trainer(cfg, engine_factory=partial(DeepSpeedEngine, ds_config=ds_config,
                                               activation_checkpointing=activation_checkpointing))


def _run(args, ds_config=None, **kw):
    trainer = _trainer(args, ds_config, **kw)
    losses = record_losses(trainer)
    trainer.train()
    return trainer, losses


def _rel(a, b):
    assert len(a) == len(b)
    return max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def torch_reference(tmp_path_factory, reference):
    out = str(tmp_path_factory.mktemp("torch"))
    _, losses = _run(base_args(out, reference))
    return losses


@pytest.fixture(scope="module")
def torch_reference_40(tmp_path_factory, reference):
    """A 40-step run (its own LR schedule) for the shorter comparisons."""
    out = str(tmp_path_factory.mktemp("torch40"))
    _, losses = _run(base_args(out, reference, steps=40))
    return losses


# --------------------------------------------------------------------------- equivalence
def test_zero2_fp32_matches_torch_reference(tmp_path, reference, torch_reference):
    trainer, losses = _run(base_args(str(tmp_path), reference), ZERO2)
    assert trainer.engine.regroups >= 6
    assert len(losses) >= 100
    assert _rel(losses, torch_reference) <= 1e-5


def test_dropping_carried_state_is_detected(tmp_path, reference, torch_reference, monkeypatch):
    """The equivalence test must fail when the regroup loses state: prove it does."""
    import megatie.zero as zero

    monkeypatch.setattr(zero, "restore_carry", lambda *a, **k: None)
    _, losses = _run(base_args(str(tmp_path), reference), ZERO2)
    assert _rel(losses, torch_reference) > 1e-4


def test_misassigned_state_is_detected(tmp_path, reference, torch_reference, monkeypatch):
    """Untied blocks taking their *own* (stale) state instead of their source's must be caught."""
    import megatie.zero as zero

    real = zero.gather_carry

    def swapped(opt, wanted, *a):
        carry = real(opt, wanted, *a)
        keys = [k for k in carry if carry[k].moments is not None]
        if len(keys) >= 2:  # rotate the moments of same-shaped tensors
            by_shape = {}
            for k in keys:
                by_shape.setdefault(carry[k].master.shape, []).append(k)
            for ks in by_shape.values():
                if len(ks) >= 2:
                    first = carry[ks[0]].moments
                    for x, y in zip(ks, ks[1:]):
                        carry[x].moments = carry[y].moments
                    carry[ks[-1]].moments = first
        return carry

    monkeypatch.setattr(zero, "gather_carry", swapped)
    _, losses = _run(base_args(str(tmp_path), reference), ZERO2)
    assert _rel(losses, torch_reference) > 1e-4


@pytest.mark.parametrize("stage", [0, 1])
def test_zero0_and_zero1_fp32_match_reference(tmp_path, reference, torch_reference_40, stage):
    trainer, losses = _run(base_args(str(tmp_path), reference, steps=40), {"zero_optimization": {"stage": stage}})
    assert trainer.engine.regroups >= 3
    assert _rel(losses, torch_reference_40) <= 1e-5


def test_zero2_offload_matches_reference(tmp_path, reference, torch_reference_40):
    config = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    _, losses = _run(base_args(str(tmp_path), reference, steps=40), config)
    assert _rel(losses, torch_reference_40) <= 1e-5


def test_activation_checkpointing_with_tied_blocks_zero2(tmp_path, reference, torch_reference_40):
    trainer, losses = _run(base_args(str(tmp_path), reference, steps=40), ZERO2, activation_checkpointing=True)
    assert getattr(trainer.model, "is_activation_checkpointing", None) or trainer.model.is_gradient_checkpointing
    assert _rel(losses, torch_reference_40) <= 1e-5


@pytest.mark.parametrize("precision,stage", [("bf16", 0), ("bf16", 1), ("bf16", 2), ("fp16", 2)])
def test_low_precision_trains_through_regroups(tmp_path, reference, torch_reference_40, precision, stage):
    config = {"zero_optimization": {"stage": stage}, precision: {"enabled": True}}
    if precision == "fp16":
        config[precision].update({"initial_scale_power": 8, "loss_scale_window": 5})
    trainer, losses = _run(base_args(str(tmp_path), reference, steps=40, every=10), config)
    assert trainer.engine.regroups >= 3
    assert all(math.isfinite(x) for x in losses)
    assert next(trainer.model.parameters()).dtype == getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[precision])
    # Low precision follows the fp32 trajectory closely, and learns.
    assert abs(losses[-1] - torch_reference_40[-1]) / torch_reference_40[-1] < 0.05
    assert losses[-1] < losses[0]


# --------------------------------------------------------------------------- no leaks
def _live_tensor_bytes() -> int:
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
                s = obj.untyped_storage()
                if s.data_ptr() and s.data_ptr() not in seen:
                    seen.add(s.data_ptr())
                    total += s.nbytes()
        except Exception:
            continue
    return total


def test_no_leaks_after_many_regroups(tmp_path, reference):
    trainer = _trainer(base_args(str(tmp_path), reference, steps=1, every=1), ZERO2)
    engine = trainer.engine
    refs, samples = [], []
    batches = [next(trainer.loader)]
    states = [[0, 1, 2, 3, 4, 5], [0, 0, 0, 0, 0, 0]] * 4 + [[0, 1, 1, 3, 3, 5], [0, 0, 0, 0, 0, 0]]
    engine.train_step(batches)
    for state in states:
        refs += [weakref.ref(engine.engine), weakref.ref(engine.optimizer), weakref.ref(engine.basic_optimizer)]
        engine.regroup(trainer.tying.apply(state))
        engine.train_step(batches)  # every group has Adam state after a step
        gc.collect()
        trainable = count_parameters(trainer.model)[0]
        samples.append((trainable, _live_tensor_bytes(), engine.live_state_bytes()))
        assert set(engine.grad_hook_counts().values()) == {1}
        assert sum(1 for _ in trainer.model._forward_pre_hooks.values()) <= 2
    assert all(r() is None for r in refs), "an old engine or optimizer is still alive"
    assert engine.regroups == len(states)
    # Optimizer-owned bytes are exactly fp32 master + two moments per unique trainable element.
    trainable = count_parameters(trainer.model)[0]
    st = engine.live_state_bytes()
    assert trainable * 4 <= st["master_bytes"] <= trainable * 4 + 4096
    assert trainable * 8 <= st["optimizer_state_bytes"] <= trainable * 8 + 8192
    # Live tensor bytes follow the trainable count: the same state gives the same bytes each
    # time (nothing accumulates), and untied minus tied is a per-trainable-element constant.
    untied = [b for (t, b, _), s in zip(samples, states) if s == [0, 1, 2, 3, 4, 5]]
    tied = [b for (t, b, _), s in zip(samples, states) if s == [0, 0, 0, 0, 0, 0]]
    assert max(untied) - min(untied) < 64 * 1024 and max(tied) - min(tied) < 64 * 1024
    t_untied = [t for (t, _, _), s in zip(samples, states) if s == [0, 1, 2, 3, 4, 5]][0]
    t_tied = [t for (t, _, _), s in zip(samples, states) if s == [0, 0, 0, 0, 0, 0]][0]
    per_element = (untied[0] - tied[0]) / (t_untied - t_tied)
    assert 6 <= per_element <= 20, per_element  # weights + master + moments (+ grad buffers), no more


def test_unchanged_decision_rebuilds_nothing(tmp_path, reference):
    trainer = _trainer(base_args(str(tmp_path), reference, steps=1, every=1), ZERO2)
    engine = trainer.engine
    engine.train_step([next(trainer.loader)])
    engine.regroup(trainer.tying.apply([0, 1, 1, 3, 3, 5]))
    before = engine.engine
    engine.regroup(trainer.tying.apply([0, 1, 1, 3, 3, 5]))
    assert engine.engine is before and engine.regroups == 1


# --------------------------------------------------------------------------- checkpoints
def _metrics_losses(out_dir):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if r.get("event") == "train"}


def test_resume_across_regroups_is_exact(tmp_path, reference):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    args = base_args(full, reference, steps=48) + ["--checkpoint-every", "18", "--keep-checkpoints", "5"]
    t = _trainer(args, ZERO2)
    t.train()
    ckpt = os.path.join(full, "checkpoints", "step_00000018")
    assert os.path.isfile(os.path.join(ckpt, "meta.json"))
    assert open(os.path.join(full, "checkpoints", "latest")).read().strip() == "step_00000048"
    resumed = _trainer(base_args(part, reference, steps=48) + ["--resume", ckpt], ZERO2)
    assert resumed.step == 18 and resumed.tying.state == t.controller.history[0]["state"]
    resumed.train()
    a, b = _metrics_losses(full), _metrics_losses(part)
    assert sorted(b) == list(range(19, 49))
    assert max(abs(a[s] - b[s]) / abs(a[s]) for s in b) <= 1e-6
    assert [h["state"] for h in resumed.controller.history] == [h["state"] for h in t.controller.history]


def test_corrupt_or_mismatched_checkpoint_is_refused(tmp_path, reference):
    out = str(tmp_path / "run")
    _trainer(base_args(out, reference, steps=14) + ["--checkpoint-every", "14"], ZERO2).train()
    ckpt = os.path.join(out, "checkpoints", "step_00000014")
    # a different ZeRO stage
    with pytest.raises(CheckpointError, match="stage"):
        _trainer(base_args(str(tmp_path / "b"), reference, steps=20) + ["--resume", ckpt],
                 {"zero_optimization": {"stage": 1}})
    # a torch-engine run cannot take it either, and a DeepSpeed run refuses a torch checkpoint
    tout = str(tmp_path / "torch")
    _trainer(base_args(tout, reference, steps=2) + ["--checkpoint-every", "2"]).train()
    with pytest.raises(CheckpointError, match="not written by the DeepSpeed engine"):
        _trainer(base_args(str(tmp_path / "c"), reference, steps=4) + ["--resume",
                 os.path.join(tout, "checkpoints", "step_00000002")], ZERO2)
    # a truncated DeepSpeed file
    optim = [f for f in os.listdir(ckpt) if "optim_states" in f][0]
    with open(os.path.join(ckpt, optim), "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError):
        _trainer(base_args(str(tmp_path / "d"), reference, steps=20) + ["--resume", ckpt], ZERO2)


# --------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("config,match", [
    ({"train_batch_size": 8}, "--batch-size"),
    ({"train_micro_batch_size_per_gpu": 2}, "--batch-size"),
    ({"gradient_accumulation_steps": 2}, "--grad-accum"),
    ({"optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}, "--lr"),
    ({"zero_optimization": {"stage": 3}}, "ZeRO stage 3 is not supported"),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "both"),
])
def test_bad_ds_config_refused(config, match):
    with pytest.raises(ConfigError, match=match):
        load_ds_config(config)


def test_cli_reports_bad_config_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert run_main(train_main, ["--deepspeed", str(bad), "--out-dir", str(tmp_path)]) == 2
    assert run_main(train_main, ["--deepspeed", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)


def test_shipped_configs_are_valid():
    names = sorted(os.listdir(os.path.join(ROOT, "ds_configs")))
    for required in ("zero0.json", "zero1.json", "zero2.json", "zero2_offload.json"):
        assert required in names
    for name in names:
        if name.endswith(".json"):
            load_ds_config(os.path.join(ROOT, "ds_configs", name))


def test_cli_single_process_deepspeed_run(tmp_path):
    out = str(tmp_path / "cli")
    summary = train_main(["--deepspeed", os.path.join(ROOT, "ds_configs", "zero2.json"), "--out-dir", out,
                          "--max-steps", "6", "--n-layer", "3", "--n-embd", "32", "--n-head", "2", "--seq-len", "16",
                          "--batch-size", "2", "--vocab-size", "512", "--tie-every", "3", "--eval-batches", "1",
                          "--no-progress", "--tie-policy", "qlearning"])
    assert summary["steps"] == 6 and os.path.isfile(os.path.join(out, "summary.json"))
    init_deepspeed_distributed()  # the CLI tore the process group down; later tests need one
