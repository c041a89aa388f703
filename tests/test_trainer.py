"""The single-process trainer: run directory contract, resume exactness, checkpoint safety."""

import json
import math
import os
import shutil

import pytest

from megatie.config import TrainConfig
from megatie.errors import CheckpointError, ConfigError
from megatie.trainer import Trainer

SUMMARY_KEYS = ["final_val_ppl", "best_val_ppl", "mean_trainable_params", "final_trainable_params",
                "mean_independent_layers", "final_independent_layers", "final_state", "tokens_per_second",
                "peak_memory_bytes", "avg_memory_bytes", "steps", "regroup_over_step", "regroup_transient_bytes_max",
                "rank_param_checksums", "optimizer_state_bytes"]
REGROUP_KEYS = ["regroup_seconds", "regroup_transient_bytes", "regroup_transient_source", "optimizer_state_bytes"]


def small_config(out_dir, cache_dir, **overrides):
    base = dict(out_dir=str(out_dir), cache_dir=cache_dir, n_layer=4, n_embd=32, n_head=2, seq_len=32,
                batch_size=4, vocab_size=512, max_steps=24, tie_every=4, eval_every=8, eval_batches=4,
                log_every=1, progress=False, seed=7, tie_policy="qlearning")
    base.update(overrides)
    return TrainConfig.from_flat(base)


def rows(out_dir, event):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("event") == event]


def test_run_directory_contract(tmp_path, cache_dir):
    summary = Trainer(small_config(tmp_path / "run", cache_dir)).train()
    out = tmp_path / "run"
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for key in SUMMARY_KEYS:
        assert key in on_disk, key
    assert on_disk["steps"] == 24
    assert math.isfinite(on_disk["final_val_ppl"]) and on_disk["best_val_ppl"] <= on_disk["final_val_ppl"]
    assert on_disk["peak_memory_bytes"] >= on_disk["avg_memory_bytes"] > 0
    decisions = rows(out, "decision")
    # Every k steps, but none at the last step: its copies would never be trained.
    assert [d["step"] for d in decisions] == [4, 8, 12, 16, 20]
    assert on_disk["final_state"] == decisions[-1]["state"]
    regrouped = [d for d in decisions if d["structure_changed"]]
    assert regrouped and all(all(k in d for k in REGROUP_KEYS) for d in regrouped)
    assert on_disk["regroups"] == len(regrouped) and on_disk["regroup_over_step"] > 0
    # Measured on CPU by tensor storages: an untie allocates its copies and their Adam state.
    assert on_disk["regroup_transient_source"] == "tensors"
    assert on_disk["regroup_transient_bytes_max"] == max(d["regroup_transient_bytes"] for d in regrouped) > 0
    assert len(on_disk["rank_param_checksums"]) == 1
    assert on_disk["model_flops_per_token"] > 0 and on_disk["mfu"] is None  # no MFU on a CPU
    config = json.loads((out / "config.json").read_text())
    for key in ("deepspeed", "deepspeed_config", "precision", "activation_checkpointing", "adam_beta1",
                "adam_beta2", "adam_eps", "local_rank", "dist_timeout_s"):
        assert key in config, key
    assert config["precision"] == "fp32" and config["deepspeed"] is None
    assert on_disk["mean_trainable_params"] < on_disk["conventional_trainable_params"]
    assert len(rows(out, "train")) == 24 and len(rows(out, "eval")) == 3
    assert os.listdir(out / "tensorboard")
    assert (out / "checkpoints" / "best" / "meta.json").exists()


def test_conventional_keeps_every_block(tmp_path, cache_dir):
    summary = Trainer(small_config(tmp_path, cache_dir, tie_policy="conventional", max_steps=8)).train()
    assert summary["mean_independent_layers"] == 4 and summary["final_state"] == [0, 1, 2, 3]
    assert summary["final_trainable_params"] == summary["conventional_trainable_params"]
    assert rows(tmp_path, "decision") == []


def test_allowed_changes_take_effect_on_resume(tmp_path, cache_dir):
    """lr, weight decay and betas changed on resume (and allowed) are what the optimizer uses from the first
    step after it: load_state_dict alone would bring back the checkpoint's."""
    from megatie.engines.optim import lr_factor

    run = tmp_path / "run"
    Trainer(small_config(run, cache_dir, checkpoint_every=10, lr=1e-3)).train(until=10)
    cfg = small_config(run, cache_dir, resume="auto", checkpoint_every=10, lr=0.06, weight_decay=0.2,
                       adam_beta2=0.9, allow_changed=["lr", "weight_decay", "adam_beta2"])
    resumed = Trainer(cfg)
    groups = resumed.engine.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.2, 0.0] and all(g["betas"] == (0.9, 0.9) for g in groups)
    resumed.train(until=12)
    fresh = tmp_path / "fresh"  # the schedule a run at the new settings follows
    Trainer(small_config(fresh, cache_dir, lr=0.06, weight_decay=0.2, adam_beta2=0.9)).train(until=12)
    lrs = {r["step"]: r["lr"] for r in rows(run, "train") if r["step"] > 10}
    expected = {r["step"]: r["lr"] for r in rows(fresh, "train") if r["step"] > 10}
    assert lrs == expected and lrs[11] in (0.06 * lr_factor(10, resumed.cfg), 0.06 * lr_factor(11, resumed.cfg))


def test_resume_across_regroups_is_exact(tmp_path, cache_dir):
    full = tmp_path / "full"
    Trainer(small_config(full, cache_dir, checkpoint_every=10)).train()
    part = tmp_path / "part"
    Trainer(small_config(part, cache_dir, checkpoint_every=10)).train(until=10)  # a preempted job
    resumed = Trainer(small_config(part, cache_dir, resume="auto", checkpoint_every=10))
    assert resumed.step == 10
    resumed.train()
    a = {r["step"]: r["loss"] for r in rows(full, "train")}
    b = {r["step"]: r["loss"] for r in rows(part, "train") if r["step"] > 10}
    assert sorted(b) == list(range(11, 25))
    for step, loss in b.items():
        assert loss == pytest.approx(a[step], rel=1e-6), step
    da = [d["state"] for d in rows(full, "decision")]
    db = [d["state"] for d in rows(part, "decision")]
    assert da == db


def test_corrupt_and_mismatched_checkpoints(tmp_path, cache_dir):
    run = tmp_path / "run"
    Trainer(small_config(run, cache_dir, max_steps=5, checkpoint_every=5)).train()  # one decision, at step 4
    ckpt = run / "checkpoints" / "step_00000005"
    with pytest.raises(CheckpointError, match="n_embd"):
        Trainer(small_config(run, cache_dir, resume=str(ckpt), n_embd=64))
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    with open(broken / "model.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match="truncated"):
        Trainer(small_config(run, cache_dir, resume=str(broken)))
    (broken / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="has no readable meta.json"):
        Trainer(small_config(run, cache_dir, resume=str(broken)))
    garbage = tmp_path / "garbage"
    shutil.copytree(ckpt, garbage)
    size = os.path.getsize(garbage / "trainer.pt")
    (garbage / "trainer.pt").write_bytes(b"\0" * size)
    with pytest.raises(CheckpointError, match="trainer.pt' fails its SHA-256 check"):
        Trainer(small_config(run, cache_dir, resume=str(garbage)))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Trainer(small_config(tmp_path / "empty", cache_dir, resume="auto"))
    # Nothing that was written before is touched by the failed attempts.
    assert sorted(os.listdir(ckpt)) == ["meta.json", "model.safetensors", "optimizer.pt", "trainer.pt"]


def test_bad_config_values(tmp_path, cache_dir):
    with pytest.raises(ConfigError, match="unknown preset"):
        small_config(tmp_path, cache_dir, preset="huge").resolved()
    with pytest.raises(ConfigError, match="n-layer"):
        small_config(tmp_path, cache_dir, n_layer=0).resolved()
    with pytest.raises(ConfigError, match="divisible"):
        small_config(tmp_path, cache_dir, n_embd=30, n_head=4).resolved()
    with pytest.raises(ConfigError, match="tie-policy"):
        small_config(tmp_path, cache_dir, tie_policy="random").resolved()


def test_vanilla_uses_reference_block_count(tmp_path, cache_dir):
    ref = tmp_path / "ref"
    Trainer(small_config(ref, cache_dir, max_steps=8)).train()
    indep = json.loads((ref / "summary.json").read_text())["final_independent_layers"]
    summary = Trainer(small_config(tmp_path / "v", cache_dir, tie_policy="vanilla", reference_run=str(ref),
                                   max_steps=4)).train()
    assert summary["n_layer"] == indep and summary["final_independent_layers"] == indep


@pytest.mark.parametrize("policy, mode", [("qlearning", "frozen-replica"), ("replicate-only", "shared"),
                                          ("all-trainable", "shared"), ("cycle", "shared"),
                                          ("sequence", "frozen-replica")])
def test_policies_and_modes_train(tmp_path, cache_dir, policy, mode):
    summary = Trainer(small_config(tmp_path, cache_dir, tie_policy=policy, tie_mode=mode, max_steps=12,
                                   reward="neg-loss")).train()
    assert summary["steps"] == 12 and math.isfinite(summary["final_val_ppl"])
    if policy == "replicate-only":
        assert summary["final_independent_layers"] == 4
    if policy in ("cycle", "sequence"):
        assert summary["final_independent_layers"] == 2 and summary["decisions"] == 0
