"""DeepSpeed ZeRO stage 3 with ties, one process (gloo on CPU): equal to the plain torch engine through
regroups, deliberate bugs caught, mixed precision against the oracle, activation checkpointing, the
gradient probe, checkpoints resumed and exported, refusals. Two ranks: test_zero3_distributed.py."""

from __future__ import annotations

import os

import pytest
import torch

deepspeed = pytest.importorskip("deepspeed")

from megatie.engines.ds_config import load_ds_config  # noqa: E402
from megatie.errors import ConfigError  # noqa: E402
from megatie.runtime.distributed import init_deepspeed_distributed  # noqa: E402
from megatie.tools.train_cli import build_parser, config_from_args  # noqa: E402
from megatie.tying.layers import count_parameters  # noqa: E402
from megatie.trainer import Trainer  # noqa: E402
from mixed_reference import MixedPrecisionReference  # noqa: E402
from zero_helper import (  # noqa: E402
    base_args,
    max_rel as _rel,
    record_losses,
    train_recorded,
    weights_hash,
    write_reference_run,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Persistence threshold 0: every tensor is partitioned and gathered per use, even the tiny test model's
# (DeepSpeed keeps tensors below the threshold whole on every rank).
ZERO3 = {"zero_optimization": {"stage": 3, "overlap_comm": False, "stage3_param_persistence_threshold": 0}}
SYNC = None


@pytest.fixture(scope="module", autouse=True)
def dist():
    global SYNC
    SYNC = init_deepspeed_distributed()
    yield


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return write_reference_run(str(tmp_path_factory.mktemp("ref")))


def _run(args, ds_config=None, activation_checkpointing=False):
    return train_recorded(args, ds_config, SYNC, activation_checkpointing)


def _args(out, reference, steps=104, *extra):
    # No clipping: each engine sums the clipping norm in its own order (test_zero.long_args).
    return base_args(out, reference, steps=steps) + ["--grad-clip", "0", *extra]


@pytest.fixture(scope="module")
def torch_losses(tmp_path_factory, reference):
    cache = {}

    def losses(steps, *extra, counts=False):
        key = (steps, *extra)
        if key not in cache:
            trainer, run_losses = _run(_args(str(tmp_path_factory.mktemp("torch")), reference, steps, *extra))
            cache[key] = run_losses, count_parameters(trainer.model)
        return cache[key][1] if counts else cache[key][0]

    return losses


# --------------------------------------------------------------------------- equivalence and its bugs
OFFLOADED = {"zero_optimization": {**ZERO3["zero_optimization"], "offload_optimizer": {"device": "cpu"}}}


@pytest.mark.parametrize("config", [ZERO3, OFFLOADED], ids=["partitioned", "optimizer offloaded"])
def test_zero3_fp32_equals_the_torch_engine_through_regroups(tmp_path, reference, torch_losses, config):
    trainer, losses = _run(_args(str(tmp_path), reference), config)
    assert type(trainer.engine.optimizer).__name__ == "DeepSpeedZeroOptimizer_Stage3"
    assert trainer.engine.regroups >= 6 and len(losses) >= 100
    assert _rel(losses, torch_losses(104)) <= 1e-6
    assert count_parameters(trainer.model) == torch_losses(104, counts=True)  # what the summary reports
    # Every weight lives as a partition; nothing outside a module's use holds it whole.
    assert all(p.numel() == 0 and p.ds_tensor.numel() > 0 for p in trainer.model.parameters())
    # One gradient hook per trainable tensor: none leaked by the regroups' rebuilds.
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert len(trainer.engine.optimizer._grad_acc_hooks) == len(trainable)


def _clone_without_the_source(self, source, delta=None):
    from megatie.engines.zero3 import partitioned_clone

    p = partitioned_clone(source)
    p.ds_tensor.zero_()  # the new root's partition is never filled from its source's
    return p


def _rotate_moments(ds_optimizer, held, source_of):
    from megatie.engines.zero3 import carry_local

    for hs in held.values():
        for t in hs.tensors[1:]:
            t.copy_(torch.roll(t.clone(), 1))
    return carry_local(ds_optimizer, held, source_of)


@pytest.mark.parametrize("bug", ["untied partition not made from its source", "moments rotated",
                                 "decay group read from the placeholder shape"])
def test_the_comparison_catches_a_broken_zero3_regroup(tmp_path, reference, torch_losses, monkeypatch, bug):
    import megatie.engines.zero3 as zero3
    import megatie.engines.zero3_engine as engine

    if bug == "untied partition not made from its source":
        monkeypatch.setattr(zero3.PartitionedTensors, "clone", _clone_without_the_source)
    elif bug == "moments rotated":
        monkeypatch.setattr(engine, "carry_local", _rotate_moments)
    else:
        import megatie.engines.optim as optim

        monkeypatch.setattr(optim, "decay_group", lambda p: 0 if p.ndim >= 2 else 1)
        import megatie.engines.deepspeed_engine as ds_engine

        monkeypatch.setattr(ds_engine, "decay_group", optim.decay_group)
    _, losses = _run(_args(str(tmp_path), reference, 40), ZERO3)
    assert not _rel(losses, torch_losses(40)) <= 1e-6  # NaN counts as detected


def test_activation_checkpointing_with_tied_blocks_zero3(tmp_path, reference, torch_losses):
    """Non-reentrant recomputation: a shared root is gathered again for the recomputed forward and its
    gradient still reduced once per step."""
    trainer, losses = _run(_args(str(tmp_path), reference, 40), ZERO3, activation_checkpointing=True)
    assert getattr(trainer.model, "is_activation_checkpointing", None) or trainer.model.is_gradient_checkpointing
    assert _rel(losses, torch_losses(40)) <= 1e-6


def test_the_gradient_probe_reads_whole_weights_under_zero3(tmp_path, torch_losses):
    """``split`` decides from every block's gradient on a probe batch: under stage 3 the probe runs with
    the weights gathered, and the run follows the torch engine's decisions and losses."""
    def args(out):
        return ["--out-dir", out, "--max-steps", "40", "--n-layer", "6", "--n-embd", "32", "--n-head", "2",
                "--seq-len", "16", "--batch-size", "2", "--vocab-size", "512", "--lr", "2e-3", "--grad-clip", "0",
                "--tie-policy", "split", "--tie-every", "8", "--eval-every", "100000", "--eval-batches", "1",
                "--checkpoint-every", "100000", "--no-progress", "--seed", "7"]

    trainer, losses = _run(args(str(tmp_path / "z3")), ZERO3)
    reference_trainer, expected = _run(args(str(tmp_path / "torch")))
    assert [d["state"] for d in trainer.controller.history] == [d["state"] for d in
                                                                reference_trainer.controller.history]
    assert trainer.engine.regroups >= 1
    assert _rel(losses, expected) <= 1e-6


@pytest.mark.parametrize("bug", [None, "new delta made without what the position computed with"])
def test_deltas_under_zero3_follow_the_torch_engine(tmp_path, reference, torch_losses, monkeypatch, bug):
    """Private norms and rank-4 deltas through the replayed regroups: deltas made (from the gathered weights,
    one slot at a time), carried, folded into an untied block's partition, dropped. Not to 1e-6 (a new
    delta is a truncated SVD: test_zero.test_deltas_under_zero2_follow_the_torch_engine says why)."""
    relax = ("--tie-relax", "norms,lora:4")
    expected = torch_losses(40, *relax)  # before any bug is injected
    if bug:
        import megatie.tying.layers as layers

        real = layers.new_delta
        monkeypatch.setattr(layers, "new_delta", lambda own, root, *a: real(None, root, *a))
    trainer, losses = _run(_args(str(tmp_path), reference, 40, *relax), ZERO3)
    assert trainer.engine.regroups >= 3 and trainer.tying.relax.rank == 4
    assert any(name.endswith("tie_delta_u") for name, _ in trainer.model.named_parameters())
    rel = _rel(losses, expected)
    assert (rel > 1e-3) if bug else (rel <= 1e-4), rel


# --------------------------------------------------------------------------- mixed precision
def test_bf16_zero3_regroups_follow_the_mixed_precision_oracle(tmp_path, reference):
    """bf16 weights, fp32 masters and moments carried through regroups: the oracle's losses (the oracle
    models ZeRO-1/2's arithmetic; stage 3 reduces each gradient into its fp32 partition the same way)."""
    args = base_args(str(tmp_path / "z3"), reference, steps=40, every=10) + ["--grad-clip", "0", "--no-checkpoints"]
    trainer, losses = _run(args, {**ZERO3, "bf16": {"enabled": True}})
    assert next(trainer.model.parameters()).dtype == torch.bfloat16 and trainer.engine.regroups >= 3
    oracle_args = base_args(str(tmp_path / "oracle"), reference, steps=40, every=10) + ["--grad-clip", "0",
                                                                                          "--no-checkpoints"]
    oracle = Trainer(config_from_args(build_parser().parse_args(oracle_args)))
    oracle.engine = MixedPrecisionReference(oracle.model, oracle.cfg, torch.bfloat16, 1.0)
    expected = record_losses(oracle)
    oracle.train()
    assert _rel(losses, expected) <= 1e-6


# --------------------------------------------------------------------------- checkpoints and export
def test_zero3_resume_across_regroups_is_exact_and_exports(tmp_path, reference):
    from megatie.tools.export import export_run, load_run

    full = str(tmp_path / "full")
    extra = ["--checkpoint-every", "18", "--keep-checkpoints", "4"]
    a_trainer, a = _run(_args(full, reference, 40, *extra), ZERO3)
    ckpt = os.path.join(full, "checkpoints", "step_00000018")
    b_trainer, b = _run(_args(str(tmp_path / "part"), reference, 40, "--resume", ckpt), ZERO3)
    assert len(b) == 40 - 18
    assert _rel(a[18:], b) <= 1e-6
    with a_trainer.engine.full_weights():
        expected = weights_hash(a_trainer.model)
    with b_trainer.engine.full_weights():
        assert weights_hash(b_trainer.model) == expected
    # The run's final checkpoint holds whole weights: an export loads as a plain model with them.
    export_run(full, str(tmp_path / "exported"), "final", "compact")
    model = load_run(full, "final")[0]
    assert weights_hash(model) == expected
    assert all(p.numel() > 0 for p in model.parameters())
    # eval and generate read the run as any other (its final checkpoint's whole weights)
    from megatie.tools.inference import generate, load_for_inference

    model, tokenizer = load_for_inference(full, "final")
    assert weights_hash(model) == expected
    assert isinstance(generate(model, tokenizer, "the", max_new_tokens=4, temperature=0), str)


def test_the_export_comparison_catches_a_stale_gather(tmp_path, reference, monkeypatch):
    """A checkpoint whose weights come from a gather made earlier (the first checkpoint's) must not pass
    for the trained model: the comparison above would see it."""
    import megatie.engines.zero3_engine as engine
    from megatie.tools.export import load_run

    first, gather = {}, engine.gathered_state_dict

    def stale(model, rank):
        if not first:
            first.update(gather(model, rank))
        return dict(first)

    monkeypatch.setattr(engine, "gathered_state_dict", stale)
    full = str(tmp_path / "full")
    trainer, _ = _run(_args(full, reference, 24, "--checkpoint-every", "12"), ZERO3)
    with trainer.engine.full_weights():
        trained = weights_hash(trainer.model)
    assert weights_hash(load_run(full, "final")[0]) != trained


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("flags,match", [
    (["--tie-mode", "frozen-replica", "--tie-policy", "alternate"], "frozen replica"),
    (["--compile"], "torch.compile"),
])
def test_what_zero3_cannot_do_is_refused_in_one_line(tmp_path, flags, match):
    args = ["--out-dir", str(tmp_path), "--max-steps", "4", "--deepspeed", os.path.join(ROOT, "ds_configs",
                                                                                        "zero3.json"), *flags]
    with pytest.raises(ConfigError, match=match) as e:
        config_from_args(build_parser().parse_args(args)).resolved()
    assert "\n" not in str(e.value)


def test_shipped_zero3_configs_are_valid():
    for name in ("zero3.json", "zero3_bf16.json", "zero3_offload.json"):
        config = load_ds_config(os.path.join(ROOT, "ds_configs", name))
        assert config["zero_optimization"]["stage"] == 3
