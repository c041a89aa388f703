"""The Llama-style family: its launcher trains, resumes exactly across regroups, exports to a model that
transformers loads on its own, and refuses a checkpoint of another family; 2 ranks under ZeRO-2 agree."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatie.tools.train_cli import build_parser, config_from_args
from megatie.models import get_spec
from megatie.trainer import Trainer
from megatie.tying.layers import LayerTying
from test_zero_distributed import _port

ROOT = Path(__file__).resolve().parents[1]
LLAMA = ROOT / "launchers" / "train_llama.py"
GPT2 = ROOT / "launchers" / "train_gpt2.py"
SHAPE = ["--n-layer", "6", "--n-embd", "32", "--n-head", "4", "--seq-len", "32", "--batch-size", "4",
         "--vocab-size", "512", "--lr", "2e-3", "--tie-every", "4", "--tie-policy", "qlearning",
         "--log-every", "1", "--eval-every", "100000", "--eval-batches", "2", "--no-progress", "--seed", "3"]


def _trainer(out, cache, *extra) -> Trainer:
    cfg = config_from_args(build_parser().parse_args(["--out-dir", str(out), "--cache-dir", str(cache), *SHAPE,
                                                      *extra]))
    cfg = cfg.replace(model="llama")
    return Trainer(cfg)


def _losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, open(Path(out) / "metrics.jsonl"))
            if r.get("event") == "train"}


def test_the_spec_builds_a_llama_with_gqa_swiglu_and_tied_embeddings():
    model = get_spec("llama").build(4, 64, 4, 32, 512, seed=0)
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and cfg.num_key_value_heads == 2
    assert cfg.intermediate_size == 192 and model.lm_head.weight is model.model.embed_tokens.weight
    same = get_spec("llama").build(4, 64, 4, 32, 512, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), same.parameters()))  # seeded


def test_tied_llama_blocks_compute_with_one_tensor_and_keep_their_own_layer_index():
    model = get_spec("llama").build(4, 32, 4, 32, 97, seed=0)
    tying = LayerTying(model, "shared", block_path="model.layers")
    tying.initialize([0, 1, 0, 1])
    layers = model.model.layers
    assert layers[2].self_attn.q_proj.weight is layers[0].self_attn.q_proj.weight
    assert layers[3].mlp.gate_proj.weight is layers[1].mlp.gate_proj.weight
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2, 3]   # per-block KV-cache slots
    x = torch.randint(0, 97, (1, 12))
    with torch.no_grad():  # cached generation gives the same logits as a full forward of the tied model
        full = model(x).logits[0, -1]
        past = model(x[:, :-1], use_cache=True).past_key_values
        step = model(x[:, -1:], past_key_values=past, use_cache=True).logits[0, -1]
    assert torch.allclose(full, step, atol=1e-5)


def test_llama_resume_across_regroups_is_exact(tmp_path):
    full = _trainer(tmp_path / "full", tmp_path / "c", "--max-steps", "12", "--checkpoint-every", "6")
    full.train()
    assert full.stats["regroups"] >= 1
    part = _trainer(tmp_path / "part", tmp_path / "c", "--max-steps", "12", "--resume",
                    str(tmp_path / "full" / "checkpoints" / "step_00000006"))
    part.train()
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "part")
    assert sorted(b) == list(range(7, 13)) and all(a[s] == b[s] for s in b)
    assert json.loads((tmp_path / "full" / "config.json").read_text())["model"] == "llama"


def _cli(script, *args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MEGATIE_DEBUG")}
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_launcher_trains_exports_and_refuses_another_familys_checkpoint(tmp_path):
    run, cache = tmp_path / "run", tmp_path / "c"
    r = _cli(LLAMA, "--out-dir", run, "--cache-dir", cache, *SHAPE, "--max-steps", "8", "--checkpoint-every", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["final_independent_layers"] < 6
    export = tmp_path / "hf"
    r = subprocess.run([sys.executable, "-m", "megatie", "export", str(run), str(export)], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    probe = ("import sys, json, torch; sys.modules['megatie'] = None\n"
             "from transformers import AutoModelForCausalLM\n"
             f"m = AutoModelForCausalLM.from_pretrained({str(export)!r})\n"
             "x = torch.arange(1, 21).unsqueeze(0)\n"
             "print(type(m).__name__, json.dumps(m(x).logits[0, -1, :5].tolist()))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    name, logits = out.stdout.split(" ", 1)
    from megatie.tools.export import load_run

    ours = load_run(str(run))[0](torch.arange(1, 21).unsqueeze(0)).logits[0, -1, :5]
    assert name == "LlamaForCausalLM" and torch.allclose(ours, torch.tensor(json.loads(logits)), atol=1e-5)
    r = _cli(GPT2, "--out-dir", run, "--cache-dir", cache, "--resume", "auto", "--no-progress")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "checkpoint was made with model='llama', this run has 'gpt2'" in r.stderr


@pytest.mark.slow  # about 40 s: the deepspeed launcher, two CPU ranks, regroups under ZeRO-2
def test_two_ranks_zero2_train_llama_with_regroups_and_agree(tmp_path):
    if shutil.which("deepspeed") is None:
        pytest.skip("the deepspeed launcher is not installed")
    port = _port()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MEGATIE_DEBUG")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    r = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(port), str(LLAMA), "--deepspeed",
                        str(ROOT / "ds_configs" / "zero2.json"), "--out-dir", str(tmp_path / "run"), "--cache-dir",
                        str(tmp_path / "c"), *SHAPE, "--max-steps", "12", "--no-checkpoints"],
                       capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["regroups"] >= 1 and summary["engine"] == "deepspeed"
    assert len(set(summary["rank_param_checksums"])) == 1
