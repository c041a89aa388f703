"""The One Billion Word Benchmark's own layout, read from a local directory, and its stand-in."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatie.data import build_lm_data, make_corpus
from megatie.data.sources import LM1B_HELDOUT, LM1B_TRAIN
from megatie.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
STANDIN = ROOT / "benchmarks" / "make_lm1b_standin.py"
PREPARE = ROOT / "launchers" / "prepare_data.py"


def _run(script, *args):
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, USE_TORCH="0"), timeout=300)


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm1b") / "r13output"
    r = _run(STANDIN, "--out", out, "--words", 300_000)
    assert r.returncode == 0, r.stderr
    return out


def _tree_digest(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(d)).encode() + p.read_bytes())
    return h.hexdigest()


def test_standin_has_the_release_layout_and_is_reproducible(standin, tmp_path):
    train = sorted((standin / LM1B_TRAIN).iterdir())
    held = sorted((standin / LM1B_HELDOUT).iterdir())
    assert [p.name for p in train] == [f"news.en-{n:05d}-of-00100" for n in range(1, 100)]
    assert [p.name for p in held] == [f"news.en.heldout-{n:05d}-of-00050" for n in range(50)]
    words = sum(len(p.read_text().split()) for p in train)
    assert 300_000 <= words < 310_000
    lines = train[0].read_text().splitlines()
    assert len(set(lines)) > 0.9 * len(lines) and all(len(line.split()) >= 2 for line in lines)
    again = tmp_path / "again"
    assert _run(STANDIN, "--out", again, "--words", 300_000).returncode == 0
    assert _tree_digest(again) == _tree_digest(standin)
    r = _run(STANDIN, "--out", again, "--words", 1000)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "exists" in r.stderr


def test_prepared_from_the_release_layout(standin, tmp_path):
    r = _run(PREPARE, "--dataset", "lm1b", "--dataset-dir", standin, "--out-dir", tmp_path / "D",
             "--cache-dir", tmp_path / "c", "--vocab-size", 512, "--no-progress")
    assert r.returncode == 0, r.stderr
    data = build_lm_data(data_dir=tmp_path / "D", seq_len=32)
    meta = json.loads((tmp_path / "D" / "meta.json").read_text())
    assert [Path(s["path"]).name for s in meta["sources"]["valid"]] == ["news.en.heldout-00000-of-00050"]
    assert len(meta["sources"]["train"]) == 99
    # The validation split is exactly the first held-out file, tokenized.
    held = (standin / LM1B_HELDOUT / "news.en.heldout-00000-of-00050").read_text().splitlines()
    want = np.array([i for ids in data.tokenizer.encode_lines(held) for i in ids])
    got = np.concatenate([b.numpy().ravel() for b in data.eval_batches("valid", 64)])
    assert len(got) == len(want) // 32 * 32 and (got == want[:len(got)]).all()


def test_bad_release_directories_name_what_is_missing(standin, tmp_path):
    with pytest.raises(DataError, match="is not a directory"):
        make_corpus(dataset="lm1b", dataset_dir=tmp_path / "nowhere")
    empty = tmp_path / "empty"
    (empty / LM1B_TRAIN).mkdir(parents=True)
    (empty / LM1B_TRAIN / "README").write_text("no text here")
    with pytest.raises(DataError, match="holds no training text"):
        make_corpus(dataset="lm1b", dataset_dir=empty)
    r = _run(PREPARE, "--dataset", "lm1b", "--dataset-dir", empty, "--out-dir", tmp_path / "D")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "holds no training text" in r.stderr
    (empty / LM1B_TRAIN / "news.en-00001-of-00100").write_text("one sentence .\n")
    with pytest.raises(DataError, match="news.en.heldout-00000-of-00050 \\(the validation file\\)"):
        make_corpus(dataset="lm1b", dataset_dir=empty)
    with pytest.raises(DataError, match="use it with --dataset lm1b"):
        make_corpus(dataset="wikitext-2", dataset_dir=standin)
