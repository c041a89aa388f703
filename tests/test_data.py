"""Data pipeline tests on the embedded corpus and generated files (no network, no shared data)."""
from __future__ import annotations

import functools
import gzip
import json
import operator
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatie.data import MLMCollator, build_lm_data, make_corpus, open_tokens, prepare
from megatie.data import prepared as prepared_mod
from megatie.data import shards as shards_mod
from megatie.data.journal import ShardWriter
from megatie.data.sources import default_corpus_text
from megatie.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "launchers" / "prepare_data.py"


def _lines():
    return [l.strip() for t in default_corpus_text() for l in t.splitlines() if l.strip()]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def data(cache):
    return build_lm_data(seq_len=64, cache_dir=cache)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("txt") / "corpus.txt"
    p.write_text("\n".join(_lines()[:3000]) + "\n", encoding="utf-8")
    return p


def run_launcher(*args):
    return subprocess.run([sys.executable, str(LAUNCHER), *map(str, args)], capture_output=True,
                          text=True, timeout=120)


# ----------------------------------------------------------------------------- default corpus
def test_default_corpus_end_to_end(data):
    assert data.splits == ["train", "valid", "test"]
    assert data.vocab_size == data.tokenizer.vocab_size == 4096
    assert data.meta["dtype"] == "uint16"
    assert data.num_tokens("train") > 10 * data.num_tokens("valid") > 0
    assert data.tokenizer.name.startswith("sentencepiece-4096-")
    ids = data.tokenizer.encode("The for statement iterates over a sequence.")
    assert data.tokenizer.decode(ids) == "The for statement iterates over a sequence."
    batch = next(data.train_loader(4, seed=0))
    assert batch.shape == (4, 64) and batch.dtype == torch.long
    assert int(batch.max()) < data.vocab_size


def test_splits_partition_the_token_stream(data):
    # The three splits are consecutive slices of one stream: nothing lost, nothing shared.
    meta, tok, segs = open_tokens(data.path)
    total = sum(s["num_tokens"] for s in meta["shards"])
    assert sum(meta["splits"][n]["num_tokens"] for n in ("train", "valid", "test")) == total
    joined = np.concatenate([np.concatenate(segs[n]) for n in ("train", "valid", "test")])
    raw = np.fromfile(data.path / meta["shards"][0]["file"], dtype=np.uint16)
    assert np.array_equal(joined, raw)


def test_exact_resume_across_epochs(data):
    a = data.train_loader(128, seed=7)
    # The corpus size differs between Python versions: derive the run length from it, so that the
    # run below always crosses two epoch boundaries after the resume point.
    per_epoch = a.samples_per_epoch // 128
    assert per_epoch >= 1
    for _ in range(per_epoch // 2 + 1):
        next(a)
    state = a.state_dict()
    assert all(isinstance(v, int) for v in state.values())
    expected = [next(a) for _ in range(2 * per_epoch + 2)]
    b = data.train_loader(128, seed=7)
    b.load_state_dict(json.loads(json.dumps(state)))
    got = [next(b) for _ in range(2 * per_epoch + 2)]
    assert all(torch.equal(x, y) for x, y in zip(expected, got))
    assert b.epoch == a.epoch >= 2


def test_rank_shards_are_disjoint_and_cover_the_epoch(data):
    world, mb = 3, 8
    loaders = [data.train_loader(mb, seed=3, rank=r, world_size=world) for r in range(world)]
    spe = loaders[0].samples_per_epoch
    n = data.num_sequences("train")
    assert spe == (n // world) // mb * mb
    for epoch in (0, 1):
        parts = [l.epoch_indices(epoch) for l in loaders]
        allidx = np.concatenate(parts)
        assert len(set(allidx.tolist())) == world * spe          # disjoint
        assert n - world * spe < world * mb                       # only a remainder is dropped
        perm = np.random.default_rng([3, epoch]).permutation(n)
        assert np.array_equal(allidx, perm[:world * spe])
    assert not np.array_equal(loaders[0].epoch_indices(0), loaders[0].epoch_indices(1))
    # The batches are the sequences the indices name.
    split = data._splits["train"]
    first = next(loaders[1])
    assert torch.equal(first, split.batch(loaders[1].epoch_indices(0)[:mb]))


def test_random_batch_uses_only_its_generator(data):
    plain = data.train_loader(4, seed=1)
    mixed = data.train_loader(4, seed=1)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(3):
        x = next(plain)
        r1 = data.random_batch("valid", 3, g1)
        r2 = data.random_batch("valid", 3, g2)
        assert torch.equal(next(mixed), x) and torch.equal(r1, r2)
        assert r1.shape == (3, 64)


def test_eval_batches_cover_split_in_order(data):
    batches = list(data.eval_batches("valid", 5))
    n = data.num_sequences("valid")
    assert sum(len(b) for b in batches) == n and len(batches[-1]) == n - 5 * (len(batches) - 1)
    flat = torch.cat(batches).flatten().numpy()
    seg = np.concatenate(open_tokens(data.path)[2]["valid"])
    assert np.array_equal(flat, seg[:n * 64])
    assert len(list(data.eval_batches("valid", 5, max_batches=2))) == 2
    assert all(torch.equal(a, b) for a, b in zip(data.eval_batches("valid", 5), batches))


def test_cache_hit_does_not_retokenize(data, cache, monkeypatch):
    mtime = (data.path / "meta.json").stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("re-tokenized on a cache hit")

    monkeypatch.setattr(shards_mod, "_tokenize_stream", boom)
    again = build_lm_data(seq_len=32, cache_dir=cache)
    assert again.path == data.path and (data.path / "meta.json").stat().st_mtime_ns == mtime


# ----------------------------------------------------------------------------- files
def test_text_file_holdout_is_end_of_text(text_file, tmp_path):
    d = build_lm_data(train_files=[str(text_file)], vocab_size=512, seq_len=32,
                      cache_dir=tmp_path, holdout_fraction=0.1)
    assert d.splits == ["train", "valid"] and d.vocab_size == 512
    lines = text_file.read_text().splitlines()
    want = np.array([i for ids in d.tokenizer.encode_lines(lines) for i in ids])
    _, _, segs = open_tokens(d.path)
    train, valid = np.concatenate(segs["train"]), np.concatenate(segs["valid"])
    assert np.array_equal(np.concatenate([train, valid]), want)
    assert abs(len(valid) / len(want) - 0.1) < 0.01


def test_globs_jsonl_gz_and_valid_files(text_file, tmp_path):
    lines = text_file.read_text().splitlines()
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("\n".join(lines[:1000]) + "\n")
    with gzip.open(src / "b.txt.gz", "wt") as f:
        f.write("\n".join(lines[1000:2000]) + "\n")
    with gzip.open(src / "c.jsonl.gz", "wt") as f:
        for i in range(2000, 2500, 5):
            f.write(json.dumps({"text": "\n".join(lines[i:i + 5]), "id": i}) + "\n")
    (tmp_path / "v.jsonl").write_text("".join(json.dumps({"text": l}) + "\n" for l in lines[2500:]))
    d = build_lm_data(train_files=[str(src / "*")], valid_files=[str(tmp_path / "v.jsonl")],
                      vocab_size=512, seq_len=32, cache_dir=tmp_path / "c")
    _, tok, segs = open_tokens(d.path)
    want = [i for ids in tok.encode_lines(lines[:2500]) for i in ids]
    assert np.concatenate(segs["train"]).tolist() == want
    assert np.concatenate(segs["valid"]).tolist() == [i for ids in tok.encode_lines(lines[2500:]) for i in ids]


def test_parallel_workers_and_multi_shard_match_in_process(text_file, tmp_path, monkeypatch):
    # Workers read byte ranges of plain text; the in-process path streams through datasets.
    monkeypatch.setattr(shards_mod, "TASK_CHARS", 2048)
    corpus = make_corpus([str(text_file)])
    one = prepare(corpus, tmp_path / "one", vocab_size=512, cache_dir=tmp_path, num_workers=0)
    many = prepare(make_corpus([str(text_file)]), tmp_path / "many", vocab_size=512,
                   cache_dir=tmp_path, num_workers=2, shard_tokens=1000)
    m1, _, s1 = open_tokens(one)
    m2, _, s2 = open_tokens(many)
    assert len(m2["shards"]) > 10 and len(m1["shards"]) == 1
    for split in ("train", "valid"):
        assert np.array_equal(np.concatenate(s1[split]), np.concatenate(s2[split]))
    a = build_lm_data(data_dir=one, seq_len=48)
    b = build_lm_data(data_dir=many, seq_len=48)     # sequences straddle shard boundaries
    la, lb = a.train_loader(16, 0), b.train_loader(16, 0)
    assert all(torch.equal(next(la), next(lb)) for _ in range(20))


def test_launcher_cache_hit_and_no_overwrite(text_file, tmp_path):
    out = tmp_path / "D"
    r1 = run_launcher("--train-file", text_file, "--vocab-size", 512, "--out-dir", out,
                      "--cache-dir", tmp_path / "c")
    assert r1.returncode == 0, r1.stderr
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    r2 = run_launcher("--train-file", text_file, "--vocab-size", 512, "--out-dir", out,
                      "--cache-dir", tmp_path / "c")
    assert r2.returncode == 0 and json.loads(r2.stdout)["cache_hit"] is True
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    other = tmp_path / "other.txt"
    other.write_text(text_file.read_text()[::-1])
    r3 = run_launcher("--train-file", other, "--out-dir", out, "--cache-dir", tmp_path / "c")
    assert r3.returncode == 2 and "already holds different prepared data" in r3.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


# ----------------------------------------------------------------------------- atomicity
def test_interrupted_write_leaves_nothing_that_looks_complete(text_file, tmp_path, monkeypatch):
    out = tmp_path / "D"
    real = ShardWriter.write

    def dies(self, arr):
        real(self, arr[: len(arr) // 2])       # half a shard is on disk when the run dies
        assert any(self.root.glob("train-*.bin"))
        raise KeyboardInterrupt

    monkeypatch.setattr(ShardWriter, "write", dies)
    with pytest.raises(KeyboardInterrupt):
        prepare(make_corpus([str(text_file)]), out, vocab_size=512, cache_dir=tmp_path, num_workers=0)
    assert not out.exists() and (tmp_path / ".D.partial").is_dir()   # kept: the next run continues it
    monkeypatch.setattr(ShardWriter, "write", real)
    # A staging dir of the earlier naming, left by a killed process, complete-looking meta.json included.
    stale = tmp_path / ".D.partial-999999999"
    stale.mkdir()
    (stale / "train-00000.bin").write_bytes(b"\x01\x00" * 10)
    (stale / "meta.json").write_text("{}")
    with pytest.raises(DataError, match="not a prepared data directory"):
        build_lm_data(data_dir=out, seq_len=32)
    prepare(make_corpus([str(text_file)]), out, vocab_size=512, cache_dir=tmp_path, num_workers=0)
    assert not stale.exists() and not (tmp_path / ".D.partial").exists() and (out / "meta.json").exists()
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.model", "train-00000.bin"]
    assert build_lm_data(data_dir=out, seq_len=32).num_tokens("train") > 1000


def test_shard_size_mismatch(text_file, tmp_path):
    out = prepare(make_corpus([str(text_file)]), tmp_path / "D", vocab_size=512,
                  cache_dir=tmp_path, num_workers=0)
    shard = out / "train-00000.bin"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 2)
    with pytest.raises(DataError, match="has .* bytes but meta.json says"):
        build_lm_data(data_dir=out)
    shard.unlink()                                      # removed between preparation and training
    with pytest.raises(DataError, match=f"shard {shard} is missing; delete {out} and prepare again"):
        build_lm_data(data_dir=out)


@pytest.fixture(scope="module")
def prepared(text_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prepared")
    return prepare(make_corpus([str(text_file)]), tmp / "D", vocab_size=512, cache_dir=tmp, num_workers=0)


def test_out_of_vocabulary_ids_are_refused(prepared, tmp_path, monkeypatch):
    out = Path(shutil.copytree(prepared, tmp_path / "D"))
    shard = out / "train-00000.bin"
    ids = np.fromfile(shard, dtype=np.uint16)
    assert int(ids.max()) < 512
    with open(shard, "r+b") as f:
        f.seek(2 * 4321)
        f.write(b"\xff" * 6)                               # ids 4321..4323 become 65535
    needle = f"shard {shard} holds token id 65535 at position 4321"
    with pytest.raises(DataError, match="vocabulary size 512") as ei:   # inside the head checked at open
        build_lm_data(data_dir=out, seq_len=32)
    assert needle in str(ei.value)
    monkeypatch.setattr(prepared_mod, "HEAD_TOKENS", 1000)  # past the head: found by the batch that reads it
    data = build_lm_data(data_dir=out, seq_len=32)
    with pytest.raises(DataError, match="vocabulary size 512") as ei:
        for _ in data.eval_batches("train", 8):
            pass
    assert needle in str(ei.value)
    loader = data.train_loader(8, seed=0)
    with pytest.raises(DataError, match="holds token id 65535 at position 4321"):
        for _ in range(loader.samples_per_epoch // 8):
            next(loader)
    ids[:] = 511                                        # the largest valid id passes
    ids.tofile(shard)
    data = build_lm_data(data_dir=out, seq_len=32)
    assert sum(len(b) for b in data.eval_batches("train", 64)) == data.num_sequences("train")


@pytest.mark.parametrize("path, needle", [
    (("dtype",), "has no 'dtype'"),
    (("vocab_size",), "has no 'vocab_size'"),
    (("shards",), "has no 'shards'"),
    (("shards", 0, "num_tokens"), "has no 'num_tokens' in shards[0]"),
    (("splits", "train", "segments", 0, "offset"), "has no 'offset' in splits['train'].segments[0]"),
    (("tokenizer", "name"), "has no 'name' in 'tokenizer'"),
    (("format",), "has no 'format'"),
])
def test_meta_without_a_key_names_it(prepared, tmp_path, path, needle):
    out = Path(shutil.copytree(prepared, tmp_path / "D"))
    meta = json.loads((out / "meta.json").read_text())
    functools.reduce(operator.getitem, path[:-1], meta).pop(path[-1])
    (out / "meta.json").write_text(json.dumps(meta))
    for attempt in (lambda: build_lm_data(data_dir=out, seq_len=32), lambda: open_tokens(out)):
        with pytest.raises(DataError) as ei:
            attempt()
        assert str(ei.value).startswith(f"{out} is damaged: its meta.json {needle}")


def test_meta_with_wrong_values(prepared, tmp_path):
    out = Path(shutil.copytree(prepared, tmp_path / "D"))
    good = json.loads((out / "meta.json").read_text())
    for change, needle in [
        (lambda m: m.update(dtype="float32"), "'dtype' = 'float32', not uint16 or uint32"),
        (lambda m: m["shards"][0].update(num_tokens="12"), "'num_tokens' in shards[0] = '12', not a non-negative"),
        (lambda m: m["splits"]["valid"]["segments"][0].update(file="nope.bin"), "names shard 'nope.bin'"),
        (lambda m: m["splits"]["valid"]["segments"][0].update(length=10 ** 9), "past the"),
    ]:
        meta = json.loads(json.dumps(good))
        change(meta)
        (out / "meta.json").write_text(json.dumps(meta))
        with pytest.raises(DataError, match="is damaged") as ei:
            open_tokens(out)
        assert needle in str(ei.value)


def test_launcher_reports_a_damaged_directory(prepared, text_file, tmp_path):
    out = Path(shutil.copytree(prepared, tmp_path / "D"))
    meta = json.loads((out / "meta.json").read_text())
    del meta["splits"]
    (out / "meta.json").write_text(json.dumps(meta))
    r = run_launcher("--train-file", text_file, "--vocab-size", 512, "--out-dir", out, "--cache-dir", tmp_path / "c")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr == f"error: {out} is damaged: its meta.json has no 'splits'; delete it and prepare again\n"


# ----------------------------------------------------------------------------- errors
def _err(tmp_path, **kw):
    kw.setdefault("cache_dir", tmp_path / "c")
    kw.setdefault("vocab_size", 512)
    with pytest.raises(DataError) as ei:
        build_lm_data(**kw)
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


def test_error_messages(tmp_path, text_file, monkeypatch):
    assert "file not found" in _err(tmp_path, train_files=[str(tmp_path / "nope.txt")])
    assert "no file matches" in _err(tmp_path, train_files=[str(tmp_path / "*.nope")])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    assert "corpus is empty" in _err(tmp_path, train_files=[str(empty)])
    binf = tmp_path / "blob.txt"
    binf.write_bytes(bytes(range(256)) * 10)
    assert "looks binary" in _err(tmp_path, train_files=[str(binf)])
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n".encode("latin-1") * 50)
    assert "not UTF-8" in _err(tmp_path, train_files=[str(latin)])
    assert "fewer than one sequence" in _err(tmp_path, train_files=[str(text_file)], seq_len=100_000)
    assert "unknown dataset" in _err(tmp_path, dataset="imagenet")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    msg = _err(tmp_path, dataset="wikitext-103")
    assert "offline" in msg and "--train-file" in msg
    assert "unknown tokenizer" in _err(tmp_path, tokenizer="no/such/tokenizer")
    assert "not a prepared data directory" in _err(tmp_path, data_dir=tmp_path / "missing")


def test_gpt2_unavailable_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    from megatie.data import tokenizers
    monkeypatch.setattr(tokenizers, "HFTokenizer", _NoCacheHF)
    msg = _err(tmp_path, tokenizer="gpt2")
    assert msg == tokenizers.GPT2_MISSING


class _NoCacheHF:
    # Stands in for an empty cache even on a machine where GPT-2 happens to be cached.
    def __init__(self, name):
        from megatie.data.tokenizers import GPT2_MISSING
        raise DataError(GPT2_MISSING)


def test_launcher_errors_are_one_line_exit_2(tmp_path):
    r = run_launcher("--train-file", tmp_path / "missing.txt", "--out-dir", tmp_path / "D")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "file not found" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "D").exists()


@pytest.mark.parametrize("args,needle", [
    ([], "required: --out-dir"),
    (["--vocab-size", "0"], "--vocab-size must be in"),
    (["--holdout-fraction", "1.5"], "--holdout-fraction must be in"),
    (["--workers=-1"], "--workers must be at least 0"),
])
def test_launcher_flag_mistakes_are_one_line_not_a_usage_block(tmp_path, args, needle):
    extra = [] if not args else ["--out-dir", tmp_path / "D"]
    r = run_launcher(*args, *extra)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr
    assert not (tmp_path / "D").exists()


# ----------------------------------------------------------------------------- mlm
def test_mlm_collator_statistics(data):
    tok = data.tokenizer
    assert None not in (tok.mask_id, tok.cls_id, tok.sep_id, tok.pad_id)
    col = MLMCollator(tok, data.vocab_size, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(10, data.vocab_size, (256, 256))
    ids[:, 0] = tok.eos_id
    inputs, labels = col(ids)
    chosen = labels != -100
    assert torch.equal(labels[chosen], ids[chosen])
    assert not chosen[:, 0].any()                         # special ids are never chosen
    frac = chosen[:, 1:].float().mean().item()
    assert 0.14 < frac < 0.16
    masked = (inputs == tok.mask_id) & chosen
    kept = (inputs == ids) & chosen
    assert abs(masked.sum().item() / chosen.sum().item() - 0.8) < 0.02
    assert abs(kept.sum().item() / chosen.sum().item() - 0.1) < 0.02
    assert torch.equal(inputs[~chosen], ids[~chosen])
    assert build_lm_data(data_dir=data.path, seq_len=64, mlm=True).mlm_collator() is not None


def test_dtype_choice():
    assert shards_mod.dtype_for(65535) == np.uint16
    assert shards_mod.dtype_for(65536) == np.uint32 and shards_mod.dtype_for(100_000) == np.uint32
