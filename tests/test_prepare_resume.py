"""Preparation that is interrupted - by an exception, ``kill -9`` or a full disk - continues when the
same command runs again, and ends with shards byte-identical to an uninterrupted run."""
from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from megatie.data import journal as journal_mod
from megatie.data import make_corpus, prepare
from megatie.data import shards as shards_mod
from megatie.data.journal import Journal, ShardWriter
from megatie.data.sources import default_corpus_text
from megatie.errors import DataError
from megatie.runtime.runlock import RunLock

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "launchers" / "prepare_data.py"
STANDIN = ROOT / "benchmarks" / "make_lm1b_standin.py"


def _digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())
            if p.name != "meta.json"}


def _corpus_file(path: Path, copies: int) -> Path:
    lines = [ln.strip() for t in default_corpus_text() for ln in t.splitlines() if ln.strip()]
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(copies):
            rng.shuffle(lines)
            f.write("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return _corpus_file(tmp_path_factory.mktemp("text") / "corpus.txt", 3)   # about 20 tasks


@pytest.fixture
def small_tasks(monkeypatch):
    monkeypatch.setattr(shards_mod, "TASK_CHARS", 1 << 14)      # byte ranges of 64 KiB: dozens of tasks
    monkeypatch.setattr(journal_mod, "JOURNAL_EVERY_S", 0.0)     # every finished task journaled


def _prepare(text, out, cache, **kw):
    return prepare(make_corpus([str(text)]), out, vocab_size=512, cache_dir=cache, num_workers=0,
                   shard_tokens=40_000, **kw)


@pytest.mark.parametrize("die_at", [1, 6, 12])
def test_interrupted_preparation_continues_to_identical_shards(text, tmp_path, small_tasks, monkeypatch, die_at):
    reference = _digests(_prepare(text, tmp_path / "ref", tmp_path / "c"))
    assert sum(name.startswith("train-") for name in reference) >= 4   # rollovers happen
    real_write, calls = ShardWriter.write, {"n": 0}

    def dies(self, arr):
        real_write(self, arr)                 # on disk but never journaled: must be cut away
        calls["n"] += 1
        if calls["n"] == die_at:
            raise KeyboardInterrupt

    monkeypatch.setattr(ShardWriter, "write", dies)
    out = tmp_path / "D"
    with pytest.raises(KeyboardInterrupt):
        _prepare(text, out, tmp_path / "c")
    monkeypatch.setattr(ShardWriter, "write", real_write)
    recorded = json.loads((tmp_path / ".D.partial" / journal_mod.JOURNAL).read_text())
    done_before = recorded["current"]["tasks"] if recorded["current"] else 0
    assert done_before == die_at - 1

    encoded = {"n": 0}
    real_encode = shards_mod._encode_local

    def counting(*args):
        encoded["n"] += 1
        return real_encode(*args)

    monkeypatch.setattr(shards_mod, "_encode_local", counting)
    _prepare(text, out, tmp_path / "c")
    total_tasks = sum(1 for _ in shards_mod._pieces(make_corpus([str(text)]).streams["train"]))
    assert encoded["n"] == total_tasks - done_before      # continued, not started over
    assert _digests(out) == reference
    assert not (tmp_path / ".D.partial").exists()


def test_a_journal_of_another_request_is_not_followed(text, tmp_path, small_tasks):
    stage = tmp_path / ".D.partial"
    stage.mkdir()
    (stage / "train-00000.bin").write_bytes(b"\x07\x00" * 999)
    journal = Journal(stage, "some-other-request")
    journal.record_tokenizer({"kind": "sentencepiece", "file": "tokenizer.model", "name": "x", "vocab_size": 9})
    out = _prepare(text, tmp_path / "D", tmp_path / "c")
    assert _digests(out) == _digests(_prepare(text, tmp_path / "ref", tmp_path / "c"))


def test_a_second_preparer_is_refused_at_once(text, tmp_path):
    stage = tmp_path / ".D.partial"
    stage.mkdir()
    lock = RunLock(str(stage)).acquire()              # this live process is preparing D
    try:
        with pytest.raises(DataError, match="another process is preparing"):
            _prepare(text, tmp_path / "D", tmp_path / "c")
    finally:
        lock.release()
    assert (_prepare(text, tmp_path / "D", tmp_path / "c") / "meta.json").exists()


def test_a_training_run_waits_for_another_preparer_and_takes_over_if_it_stops(text, tmp_path):
    stage = tmp_path / ".D.partial"
    stage.mkdir()
    lock = RunLock(str(stage)).acquire()              # another run is preparing D
    result = {}
    waiter = threading.Thread(target=lambda: result.update(out=_prepare(text, tmp_path / "D", tmp_path / "c",
                                                                        wait=True)))
    waiter.start()
    time.sleep(2.5)
    assert waiter.is_alive() and not (tmp_path / "D").exists()     # waiting, not failing, not writing
    lock.release()                                    # that run stopped without finishing: take over
    waiter.join(120)
    assert not waiter.is_alive() and (result["out"] / "meta.json").exists()


def test_a_waiter_that_gets_the_lock_after_the_seal_uses_the_result(text, tmp_path):
    """The preparer it waited for sealed between the waiter's last look and its lock: the waiter must take
    the prepared directory, not prepare again into a fresh stage (which then cannot replace it)."""
    out = _prepare(text, tmp_path / "D", tmp_path / "c")
    before = _digests(out)
    stage = tmp_path / ".D.partial"
    assert shards_mod._lock_stage(stage, out, wait=True) is None
    assert not stage.exists() and _digests(out) == before
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".") or "lock" in p.name.lower()) == []


def _launch(*args, **popen):
    env = dict(os.environ, USE_TORCH="0")
    return subprocess.Popen([sys.executable, str(LAUNCHER), "--no-progress", "--vocab-size", "512", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **popen)


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_ends_in_one_line_and_the_work_is_kept(text, tmp_path):
    ref = _launch("--train-file", text, "--out-dir", tmp_path / "ref", "--cache-dir", tmp_path / "c", "--workers", 0)
    assert ref.wait(300) == 0, ref.stderr.read()
    out = tmp_path / "D"
    args = ("--train-file", text, "--out-dir", out, "--cache-dir", tmp_path / "c", "--workers", 0)
    full = _launch(*args, preexec_fn=_limit_file_size(400_000))     # shards grow past 400 kB
    _, err = full.communicate(timeout=300)
    assert full.returncode == 2 and err.count("\n") == 1, err
    assert err.startswith("error: no space left to write") and "run the same command again" in err
    assert not out.exists() and (tmp_path / ".D.partial" / journal_mod.JOURNAL).exists()
    again = _launch(*args)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert "continuing the interrupted preparation" in err
    assert _digests(out) == _digests(tmp_path / "ref")


def _tasks_done(stage: Path) -> int:
    try:
        journal = json.loads((stage / journal_mod.JOURNAL).read_text())
    except (OSError, ValueError):
        return -1
    return journal["current"]["tasks"] if journal["current"] else (1 << 30 if journal["done"] else 0)


@pytest.mark.slow  # about 60 s: five preparations of a 28 MB corpus with two worker processes
def test_kill_9_at_random_moments_then_the_same_command_finishes_identically(tmp_path):
    text = _corpus_file(tmp_path / "big.txt", 60)
    base = ("--train-file", text, "--cache-dir", tmp_path / "c", "--workers", 2)
    ref = _launch(*base, "--out-dir", tmp_path / "ref")
    assert ref.wait(600) == 0, ref.stderr.read()
    out, stage, rng = tmp_path / "D", tmp_path / ".D.partial", random.Random(1)
    progress = []
    for kill in range(3):
        before = _tasks_done(stage)
        p = _launch(*base, "--out-dir", out, start_new_session=True)
        deadline = time.monotonic() + 120
        while _tasks_done(stage) <= before:   # this run has added work (so every run makes progress)
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()[1]
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.6))
        os.killpg(p.pid, signal.SIGKILL)               # the launcher and its workers, as a crash would
        p.wait(60)
        progress.append(_tasks_done(stage))
    assert not out.exists() and progress == sorted(progress) and progress[-1] < (1 << 30), progress
    last = _launch(*base, "--out-dir", out)
    _, err = last.communicate(timeout=600)
    assert last.returncode == 0 and "continuing the interrupted preparation" in err, err
    assert _digests(out) == _digests(tmp_path / "ref")
