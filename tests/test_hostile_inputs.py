"""Faults from outside that used to get through: a file-size limit while the tokenizer is cached, inference
flags that are not numbers, an output path that is a directory. Each ends in one line and leaves nothing
half-written behind."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from test_export import exports, megatie, one_line_error, run  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]

TRAIN_UNDER_A_LIMIT = """
import resource, sys
from megatie.data.sources import default_corpus_text
from megatie.data.tokenizers import train_sentencepiece
from megatie.errors import MegatieError

lines = [line for text in default_corpus_text() for line in text.splitlines() if line.strip()]
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    print(train_sentencepiece(lines[:20000], 2048, sys.argv[1], num_threads=1).vocab_size)
except MegatieError as e:
    print("error:", e, file=sys.stderr)
    sys.exit(2)
"""


def _train_under_limit(cache: Path, limit: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", TRAIN_UNDER_A_LIMIT, str(cache), str(limit)], capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="no file-size limit on this system")
def test_a_tokenizer_cut_short_by_a_full_disk_never_enters_the_cache(tmp_path):
    """SentencePiece ignores its failed write; the truncated model used to be renamed into the cache and
    break every later run on the corpus. Now: one line, no cache entry, and the next run trains afresh."""
    cache = tmp_path / "cache"
    r = _train_under_limit(cache, 40_000)  # a 2048-piece model is larger than this
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-2000:]
    assert "could not be written whole" in lines[0]
    assert not any(p.name.startswith("sp-") for p in (cache / "tokenizers").iterdir())
    r = _train_under_limit(cache, resource.RLIM_INFINITY)
    assert r.returncode == 0 and r.stdout.split()[-1] == "2048", r.stderr[-2000:]


@pytest.mark.parametrize("flags,needle", [
    (["--temperature", "nan"], "--temperature must be a finite number"),
    (["--temperature", "inf"], "--temperature must be a finite number"),
    (["--top-p", "nan"], "--top-p"),
])
def test_sampling_flags_that_are_not_numbers_are_refused(tmp_path, flags, needle):
    one_line_error(megatie("generate", tmp_path, "--prompt", "The", *flags), needle)


def test_eval_json_into_a_directory_is_refused_and_leaves_no_temporary(tmp_path):
    text = tmp_path / "held.txt"
    text.write_text("some text\n")
    one_line_error(megatie("eval", tmp_path, "--file", text, "--json", tmp_path), "name a file in an existing directory")
    one_line_error(megatie("eval", tmp_path, "--file", text, "--json", tmp_path / "no" / "r.json"),
                   "name a file in an existing directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["held.txt"]


@pytest.mark.parametrize("name", ["metrics.jsonl", "tensorboard"])
def test_logs_never_follow_a_link_out_of_the_run(tmp_path, name):
    from megatie.errors import ConfigError
    from megatie.metrics.logger import MetricsLogger

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "metrics.jsonl").write_text("not the run's\n")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(outside / name if name == "metrics.jsonl" else outside, run / name)
    with pytest.raises(ConfigError, match="is a symbolic link"):
        MetricsLogger(str(run))
    assert (outside / "metrics.jsonl").read_text() == "not the run's\n" and os.listdir(outside) == ["metrics.jsonl"]


def test_export_into_a_link_is_refused_and_writes_nothing(tmp_path, run):  # noqa: F811
    (tmp_path / "empty").mkdir()
    os.symlink(tmp_path / "empty", tmp_path / "link")
    one_line_error(megatie("export", run, tmp_path / "link"), "is a symbolic link")
    assert os.listdir(tmp_path / "empty") == [] and os.path.islink(tmp_path / "link")


def test_a_damaged_tokenizer_model_is_one_line_on_export(tmp_path, run):  # noqa: F811
    import shutil

    damaged = tmp_path / "run"
    shutil.copytree(run, damaged)
    model = next((damaged / "tokenizer").glob("*.model"))
    model.write_bytes(os.urandom(100))
    one_line_error(megatie("export", damaged, tmp_path / "out"), "is not a SentencePiece model")
    assert not (tmp_path / "out").exists()


def test_an_export_whose_config_lies_about_its_shape_is_one_line(tmp_path, exports):  # noqa: F811
    import json
    import shutil

    hf = tmp_path / "hf"
    shutil.copytree(exports[0], hf)
    config = json.loads((hf / "config.json").read_text())
    config["n_embd"] *= 2
    (hf / "config.json").write_text(json.dumps(config))
    r = megatie("generate", hf, "--prompt", "The")
    one_line_error(r, "its weights do not have the shapes its config.json gives")
    assert "MISMATCH" not in r.stderr + r.stdout


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_older_ones(tmp_path, monkeypatch, capsys):
    import errno

    import torch

    from megatie.checkpoint import store
    from megatie.errors import CheckpointError
    from megatie.tools.train_cli import run_main

    model = torch.nn.Linear(4, 4)
    root = tmp_path / "checkpoints"
    store.save_checkpoint(str(root), "step_00000001", 1, model, {"state": {}}, {"step": 1})

    def full(obj, path, *a, **k):
        raise RuntimeError(f"[enforce fail at inline_container.cc:664] . unexpected pos 0 vs 64: file write failed {path}")

    monkeypatch.setattr(store.torch, "save", full)
    with pytest.raises(CheckpointError, match="is the disk full"):
        store.save_checkpoint(str(root), "step_00000002", 2, model, {"state": {}}, {"step": 2})
    assert sorted(os.listdir(root)) == ["step_00000001"] and store.problem_with(str(root / "step_00000001")) is None

    def no_space(argv):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "metrics.jsonl"))

    capsys.readouterr()
    assert run_main(no_space, []) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: No space left on device writing"), lines


def test_a_corpus_of_one_long_line_trains_a_tokenizer(tmp_path):
    """SentencePiece leaves out of training every line over 4192 bytes: a file without line breaks used to
    end in "pass a smaller --vocab-size or more text". It is cut at spaces for training; nothing is lost."""
    from megatie.data.sources import default_corpus_text
    from megatie.data.tokenizers import SP_MAX_SENTENCE_BYTES, _sentences, train_sentencepiece

    text = " ".join(line for t in default_corpus_text() for line in t.splitlines() if line.strip())[:300_000]
    pieces = list(_sentences([text, "short line"]))
    assert all(len(p.encode("utf-8")) <= SP_MAX_SENTENCE_BYTES for p in pieces)
    assert " ".join(pieces).split() == (text + " short line").split() and pieces[-1] == "short line"
    assert list(_sentences(["x" * 9000])) == ["x" * 1048] * 8 + ["x" * 616]
    assert train_sentencepiece([text], 512, tmp_path, num_threads=1).vocab_size == 512


@pytest.mark.parametrize("flags,needle", [
    (["--lr", "inf"], "--lr must be a finite positive number"),
    (["--lr", "nan"], "--lr must be a finite positive number"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number"),
    (["--seed=-1"], "--seed must be in"),
])
def test_finetune_numbers_are_checked(tmp_path, run, flags, needle):  # noqa: F811
    labeled = tmp_path / "l.csv"
    labeled.write_text("text,label\nsome text,0\nmore text,1\n")
    one_line_error(megatie("finetune", run, tmp_path / "out", "--train-file", labeled, *flags), needle)
    assert not (tmp_path / "out").exists()
