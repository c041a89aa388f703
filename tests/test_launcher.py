"""The launcher as a user runs it: end to end, and bad input ending in one clear line."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "launchers", "train_gpt2.py")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("launcher-cache"))


def launch(*args, cache_dir, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "MEGATIE_DEBUG"}
    return subprocess.run([sys.executable, LAUNCHER, "--cache-dir", cache_dir, "--no-progress", *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def test_tiny_preset_end_to_end(tmp_path, cache_dir):
    out = tmp_path / "run"
    r = launch("--out-dir", str(out), "--max-steps", "30", cache_dir=cache_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    # The default policy, split: all blocks start tied; within a third of conventional's parameters
    # (two independent blocks at this size), it splits where gradients disagree.
    assert summary["steps"] == 30 and summary["n_layer"] == 12 and summary["decisions"] >= 1
    assert summary["budget_independent_layers"] == summary["final_independent_layers"] == 2
    assert summary["final_state"][0] == 0 and len(set(summary["final_state"])) == 2
    assert summary["mean_trainable_params"] <= summary["conventional_trainable_params"] / 3
    assert "final_val_ppl=" in r.stdout and f"results in {out}:" in r.stdout


def one_line_error(r):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_empty_and_too_short_corpus(tmp_path, cache_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "empty" in one_line_error(launch("--train-file", str(empty), "--out-dir", str(tmp_path / "a"),
                                            cache_dir=cache_dir)).lower()
    short = tmp_path / "short.txt"
    short.write_text("The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs.\n" * 3)
    line = one_line_error(launch("--train-file", str(short), "--out-dir", str(tmp_path / "b"), "--vocab-size", "296",
                                 cache_dir=cache_dir))
    assert "fewer than one sequence" in line
    line = one_line_error(launch("--train-file", str(short), "--out-dir", str(tmp_path / "c"), "--vocab-size", "64",
                                 cache_dir=cache_dir))
    assert "--vocab-size 64 is too small" in line and "needs at least" in line


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unsupported_half_precision_is_one_line(tmp_path, cache_dir):
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().is_fp16_supported():
        pytest.skip(f"DeepSpeed's {get_accelerator().device_name()} accelerator supports fp16 here")
    env = {k: v for k, v in os.environ.items() if k != "MEGATIE_DEBUG"}
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    r = subprocess.run([sys.executable, LAUNCHER, "--deepspeed", "ds_configs/zero2_fp16.json", "--out-dir",
                        str(tmp_path / "run"), "--cache-dir", cache_dir], capture_output=True, text=True,
                       timeout=300, env=env, cwd=ROOT)
    line = one_line_error(r)
    assert r.returncode == 2
    assert "ds_configs/zero2_fp16.json asks for fp16" in line and "ds_configs/zero2.json (fp32)" in line


def test_sigterm_prints_the_resume_hint(tmp_path, cache_dir):
    # The deepspeed launcher answers Ctrl-C by sending SIGTERM to its ranks.
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "MEGATIE_DEBUG"}
    p = subprocess.Popen([sys.executable, LAUNCHER, "--max-steps", "100000", "--out-dir", str(out), "--no-progress",
                          "--cache-dir", cache_dir], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env, cwd=ROOT)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists() and p.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert p.poll() is None, p.communicate()[1][-2000:]
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == "interrupted; checkpoints already written are intact (resume from the newest with --resume auto)"
    assert p.returncode == 130
