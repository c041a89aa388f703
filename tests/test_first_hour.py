"""What a new user meets first: every family's runs in a directory of their own, threads that suit the
machine, refusals that come before the heavy start-up and leave nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megatie.config import TrainConfig
from megatie.runtime.threads import choose_threads, usable_cores

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--seq-len", "32", "--batch-size", "4",
        "--vocab-size", "512", "--max-steps", "4", "--eval-every", "4", "--no-progress"]


def test_each_family_has_its_own_default_run_directory():
    dirs = {family: TrainConfig().replace(model=family).resolved().run.out_dir
            for family in ("gpt2", "llama", "bert", "vit")}
    assert dirs == {f: os.path.join("runs", f) for f in dirs}
    assert TrainConfig().replace(out_dir="mine").resolved().run.out_dir == "mine"


def test_threads_share_the_cores_among_local_ranks(monkeypatch):
    for name in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(name, raising=False)
    cores = usable_cores()
    assert choose_threads(None)[0] == cores
    monkeypatch.setenv("LOCAL_SIZE", "2")  # DeepSpeed's launcher, two ranks on this node
    assert choose_threads(None)[0] == max(1, cores // 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(4 * cores))  # torchrun's; never below one thread
    assert choose_threads(None)[0] == 1
    assert choose_threads(3) == (3, "--threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # set by the user or the launcher: kept
    assert choose_threads(None)[0] is None


def run_cli(argv, env=None, timeout=300):
    """The launcher's entry in a fresh process, reporting which heavy libraries it imported."""
    code = ("import sys\nfrom megatie.tools.train_cli import run_main, train_main\n"
            f"code = run_main(train_main, {list(argv)!r})\n"
            "print('imported', *sorted(m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules))\n"
            "sys.exit(code)")
    environment = {k: v for k, v in os.environ.items() if k != "MEGATIE_DEBUG"}
    environment.update(env or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=environment)


@pytest.mark.parametrize("argv, needle", [
    (["--train-file", "missing.txt"], "missing.txt"),
    (["--data-dir", "nowhere/"], "--data-dir nowhere/ is not a directory"),
    (["--resume", "nowhere/step_9"], "no such checkpoint directory"),
])
def test_a_refused_run_creates_no_directory(tmp_path, argv, needle):
    out = tmp_path / "new" / "deeper" / "run"
    r = run_cli(TINY + ["--out-dir", str(out), *argv])
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "new").exists()


def test_a_run_that_fails_on_its_data_leaves_no_directory(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    out = tmp_path / "new" / "run"
    r = run_cli(TINY + ["--out-dir", str(out), "--train-file", str(empty), "--cache-dir", str(tmp_path / "c")])
    assert r.returncode == 2 and "empty" in r.stderr, r.stderr
    assert not (tmp_path / "new").exists()


def test_resuming_a_finished_run_is_refused_before_the_heavy_start(tmp_path):
    out = tmp_path / "run"
    r = run_cli(TINY + ["--out-dir", str(out), "--cache-dir", str(tmp_path / "c")])
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["threads"] >= 1 and summary["threads_from"]
    again = ["--out-dir", str(out), "--resume", "auto", "--deepspeed", "ds_configs/zero2.json", "--no-progress"]
    r = run_cli(again)
    assert r.returncode == 2 and "nothing left to train" in r.stderr, r.stderr
    assert r.stdout.split() == ["imported"], r.stdout  # neither torch nor DeepSpeed was started
    # Under a distributed launcher every rank refuses, and one line says so for the whole job.
    quiet = run_cli(again, env={"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert quiet.returncode == 2 and quiet.stderr.strip() == ""
    # A higher --max-steps (allowed) gets past the check: the trainer then resumes the run, and a flag given
    # on the command line wins over the checkpoint's (it checkpointed every 4 steps).
    more = run_cli(["--out-dir", str(out), "--resume", "auto", "--max-steps", "6", "--allow-changed", "max_steps",
                    "--checkpoint-every", "1", "--no-progress", "--cache-dir", str(tmp_path / "c")])
    assert more.returncode == 0, more.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == 6
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000005", "step_00000006"]


def test_the_readme_example_files_are_made_offline_and_read_back(tmp_path):
    from megatie.data.labeled import read_examples

    r = subprocess.run([sys.executable, "launchers/make_examples.py", "--out-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    held = (tmp_path / "held_out.txt").read_text(encoding="utf-8")
    assert held.count("\n") > 100 and "\n\n" in held  # a raw multi-line document
    examples = read_examples(str(tmp_path / "labeled.csv"), "text", "label")
    assert len(examples.texts) >= 100 and set(examples.labels) == {0, 1}
    assert abs(sum(examples.labels) / len(examples.labels) - 0.5) < 0.01  # balanced
