"""The scale benchmarks as a user runs them, on a small stand-in: preparation measured, killed and
resumed to identical shards, loading compared; training from shards resumed exactly after a kill."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _run(script: str, *args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, str(BENCH / script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    out = tmp_path_factory.mktemp("release") / "r13output"
    r = _run("make_lm1b_standin.py", "--out", out, "--words", 3_000_000)
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.slow  # about 40 s: three preparations of 20 MB of text
def test_lm1b_scale_resumes_identically_compares_loading_and_cleans_up(standin, tmp_path):
    work, out = tmp_path / "work", tmp_path / "scale.json"
    r = _run("lm1b_scale.py", "--dataset-dir", standin, "--workdir", work, "--kills", 1, "--small-words", 5e5,
             "--batches", 200, "--vocab-size", 512, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    prep = result["prepare"]
    assert prep["tokens"] > 3_000_000 and prep["peak_rss_mb"] > 0 and 1.99 < prep["bytes_per_token"] < 2.1
    resume = result["resume"]
    assert resume["shards"] == resume["identical"] == 2 and len(resume["kills"]) == 1
    loader = result["loader"]
    assert loader["big"]["train_tokens"] > 4 * loader["small"]["train_tokens"]
    assert loader["batch_time_ratio_big_over_small"] > 0 and loader["startup_ratio_big_over_small"] > 0
    assert sorted(p.name for p in work.iterdir()) == []            # prepared directories removed


@pytest.mark.slow  # about 90 s: three 2-rank runs of the deepspeed launcher
def test_training_from_shards_resumes_exactly_after_a_kill(standin, tmp_path):
    if shutil.which("deepspeed") is None:
        pytest.skip("the deepspeed launcher is not installed")
    data = tmp_path / "data"
    r = subprocess.run([sys.executable, str(ROOT / "launchers" / "prepare_data.py"), "--dataset", "lm1b",
                        "--dataset-dir", str(standin), "--out-dir", str(data), "--cache-dir", str(tmp_path / "c"),
                        "--vocab-size", "512", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "train.json"
    r = _run("train_from_shards.py", "--data-dir", data, "--steps", 16, "--tie-every", 4, "--checkpoint-every", 8,
             "--kill-delay", 0.0, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["full"]["regroups"] >= 1 and len(result["full"]["checksums"]) == 2
    resume = result["resume"]
    assert resume["steps_compared"] == 8 and resume["max_loss_difference"] == 0.0
    assert resume["same_final_weights"]
