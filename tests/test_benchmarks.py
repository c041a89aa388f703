"""The benchmarks as a user runs them: the GPU suite's plan, and a training benchmark that honours
its settings for both rows and leaves nothing behind."""

import json
import os
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_suite_dry_run_lists_every_step_within_budget(tmp_path):
    plan = tmp_path / "plan.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_suite.py"), "--dry-run", "--out",
                        str(plan)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    steps = json.loads(plan.read_text())["steps"]
    names = [s["name"] for s in steps]
    for required in ("gpu-tests", "copy-kernel", "memory-bf16-ac", "memory-bf16"):
        assert required in names
    assert all(isinstance(s["estimate_s"], int) and s["estimate_s"] > 0 for s in steps)
    assert sum(s["estimate_s"] for s in steps if not s["optional"]) <= 540


def _bench_dirs():
    return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("megatie-bench-")}


@pytest.mark.slow  # about 30 s: three measured runs
def test_memory_benchmark_honours_checkpointing_and_leaves_nothing(tmp_path):
    before = _bench_dirs()
    out = tmp_path / "memory.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "memory.py"), "--n-layer", "3", "--n-embd", "32",
           "--n-head", "2", "--seq-len", "16", "--batch-size", "2", "--vocab-size", "512", "--max-steps", "6",
           "--tie-every", "2", "--activation-checkpointing", "--cache-dir", str(tmp_path / "cache"),
           "--out", str(out), "--variants", "megatie,split-lora8"]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    result = json.loads(out.read_text())
    assert result["settings"]["activation_checkpointing"] is True
    for variant in ("conventional", "megatie", "split-lora8"):
        assert result[variant]["activation_checkpointing"] is True and result[variant]["steps"] == 6
    assert result["megatie"]["regroups"] >= 1 and result["megatie"]["peak_tensor_bytes"] > 0
    # Relaxed ties: the deltas are trainable parameters of their own, counted beside the roots.
    lora = result["split-lora8"]
    assert lora["regroups"] >= 1 and lora["final_trainable_params"] < result["conventional"]["final_trainable_params"]
    assert set(result["ratio_conventional_over"]) == {"megatie", "split-lora8"}
    assert set(os.listdir(tmp_path)) == {"memory.json", "cache"}  # no run directory, no checkpoint
    assert _bench_dirs() == before


@pytest.mark.parametrize("keep_ends", [False, True])
def test_word_order_task_is_balanced_seeded_and_really_shuffled(keep_ends):
    import re

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from finetune_accuracy import word_order_examples

    from megatie.data.sources import default_corpus_text

    lines = [line for t in default_corpus_text() for line in t.splitlines()]
    rows = word_order_examples(lines, 200, seed=1, keep_ends=keep_ends)
    assert rows == word_order_examples(lines, 200, seed=1, keep_ends=keep_ends)
    assert sum(r["label"] for r in rows) == 100
    by_words = {}
    for sentence in (s.strip() for line in lines for s in re.split(r"(?<=[.!?])\s+", line)):
        by_words.setdefault(tuple(sorted(sentence.split())), set()).add(" ".join(sentence.split()))
    for r in rows:
        words = r["text"].split()
        sources = by_words[tuple(sorted(words))]  # the words of a real sentence, all of them
        assert 6 <= len(words) <= 40
        assert (r["text"] in sources) == (r["label"] == 0)
        if r["label"] == 1 and keep_ends:
            assert any(s.split()[0] == words[0] and s.split()[-1] == words[-1] for s in sources)


def _can_reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.slow  # about 20 s: four probes in two fresh processes
@pytest.mark.skipif(not _can_reset_peak_rss(), reason="needs Linux's /proc/self/clear_refs to reset the peak RSS")
def test_probe_memory_benchmark_shows_the_sketch_saving_gradient_memory(tmp_path):
    """Gradients dominate (one short sequence, 8 blocks of 0.8M): the sketched probe's peak stays well
    under the exact one's, with cosines a few thousandths apart."""
    out = tmp_path / "probe.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "probe_memory.py"), "--n-layer", "8",
                        "--n-embd", "256", "--seq-len", "16", "--batch", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(out.read_text())
    exact, sketched = (report["rows"][v]["probe_peak_bytes"] for v in ("exact", "sketched"))
    grads = report["rows"]["exact"]["all_block_grads_bytes"]
    assert exact >= 0.8 * grads and sketched < 0.5 * exact, (exact, sketched, grads)
    assert report["max_cosine_error"] < 0.05


@pytest.mark.slow  # eight short training runs through the launcher
def test_depth_grid_compares_the_base_with_the_best_small_model_and_resumes(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from golden import corpus_text

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text(sentences=3000))
    out = tmp_path / "grid"
    args = [sys.executable, os.path.join(ROOT, "benchmarks", "depth_grid.py"), "--train-file", str(corpus),
            "--valid-file", str(corpus), "--base", "3x32", "--candidates", "1x32,1x16/1,3x32@alternate", "--lrs", "2e-3,8e-3",
            "--seeds", "0", "--steps", "6", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1",
            "--budget", "0.9", "--out-dir", str(out), "--cache-dir", str(tmp_path / "cache")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "depth_grid.json").read_text())
    table, verdict = report["table"], report["verdict"]
    assert set(table) == {"3x32", "1x32", "1x16/1", "3x32@alternate"} and verdict["complete"]
    base_lr_ppls = table["3x32"]["by_lr"]
    assert verdict["base_ppl"] == min(runs["0"] for runs in base_lr_ppls.values())  # the base at its best lr
    small = {s: min(r["0"] for r in table[s]["by_lr"].values()) for s in ("1x32", "1x16/1")}
    assert verdict["best_small_ppl"] == min(small.values())
    assert verdict["depth_pays"] == (verdict["best_small_ppl"] / verdict["base_ppl"] >= 1.05)
    # the tied candidate trained tied, is never taken for the best untied model, and is compared with it
    tied_config = json.loads((out / "3x32_alternate_lr0.002_s0" / "config.json").read_text())
    assert tied_config["tie_policy"] == "alternate" and verdict["best_tied"] == "3x32@alternate"
    tied_ppl = min(r["0"] for r in table["3x32@alternate"]["by_lr"].values())
    assert verdict["best_tied_ppl"] == tied_ppl and verdict["tying_pays"] == (tied_ppl < verdict["best_small_ppl"])
    assert table["3x32@alternate"]["params"] < table["3x32"]["params"]
    stamp = (out / "3x32_lr0.002_s0" / "summary.json").stat().st_mtime
    r = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)  # nothing left to train
    assert r.returncode == 0 and (out / "3x32_lr0.002_s0" / "summary.json").stat().st_mtime == stamp
