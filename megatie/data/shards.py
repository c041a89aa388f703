"""Streaming, parallel, atomic preparation of token shards, and their verified loading.

Layout of a prepared directory D::

    D/meta.json            written last; its presence is what makes D complete
    D/tokenizer.model      (SentencePiece) or D/tokenizer/ (transformers), so D is self-contained
    D/<stream>-00000.bin   raw token ids, uint16 when the vocabulary fits, else uint32

Everything is written into a sibling staging directory ``.D.partial-<pid>`` that is renamed
onto D only when complete, so an interrupted run can never leave a directory that looks
prepared; the next run deletes stale staging directories of dead processes and restarts.
Text is read and written in bounded batches, so peak memory does not grow with the corpus.
"""
from __future__ import annotations

import collections
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import shutil
import time
from pathlib import Path

import numpy as np

from megatie.data.sources import Corpus, byte_ranges, read_range, sample_lines
from megatie.data.tokenizers import (SentencePieceTokenizer, load_tokenizer, resolve_tokenizer,
                                     train_sentencepiece)
from megatie.errors import DataError

FORMAT = "megatie-tokens/1"
SHARD_TOKENS = 1 << 27          # 128M tokens: 256 MB per uint16 shard
SMALL_CORPUS = 16 << 20         # bytes of text below which tokenizing in-process is faster
TASK_CHARS = 1 << 20            # text per worker task; large enough to amortise IPC
SCAN_TOKENS = 1 << 26           # ids per step of the range check: 128 MiB of uint16 in memory at most
_WORKER_TOK = None


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def _init_worker(spec):
    global _WORKER_TOK
    _WORKER_TOK = load_tokenizer(spec)


def _flatten(ids: list[list[int]], dtype) -> np.ndarray:
    return np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype,
                       count=sum(len(x) for x in ids))


def _encode_task(lines, dtype_str):
    return _flatten(_WORKER_TOK.encode_lines(lines, num_threads=1), np.dtype(dtype_str))


def _encode_range_task(path, start, end, dtype_str):
    return _encode_task(read_range(path, start, end), dtype_str)


def _encode_local(tok, lines, dtype):
    return _flatten(tok.encode_lines(lines), dtype)


class _ShardWriter:
    """Appends token arrays to numbered shard files, rolling over at ``shard_tokens``."""

    def __init__(self, root: Path, stream: str, dtype: np.dtype, shard_tokens: int):
        self.root, self.stream, self.dtype, self.cap = root, stream, dtype, shard_tokens
        self.shards: list[dict] = []
        self.f = None
        self.n = 0
        self.total = 0

    def _open(self):
        name = f"{self.stream}-{len(self.shards):05d}.bin"
        self.f = open(self.root / name, "wb")
        self.shards.append({"file": name, "stream": self.stream, "num_tokens": 0})
        self.n = 0

    def write(self, arr: np.ndarray):
        while arr.size:
            if self.f is None or self.n >= self.cap:
                self._close()
                self._open()
            take = min(arr.size, self.cap - self.n)
            self.f.write(arr[:take].tobytes())
            self.n += take
            self.total += take
            self.shards[-1]["num_tokens"] = self.n
            arr = arr[take:]

    def _close(self):
        if self.f is not None:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            self.f = None

    def close(self):
        self._close()
        for s in self.shards:
            s["bytes"] = s["num_tokens"] * self.dtype.itemsize
        return self.shards


def _chunks(stream, task_chars):
    buf, n = [], 0
    for batch in stream():
        buf.extend(batch)
        n += sum(len(x) for x in batch)
        if n >= task_chars:
            yield buf
            buf, n = [], 0
    if buf:
        yield buf


def _tokenize_stream(stream, writer, tok, dtype, pool, window):
    if pool is None:
        for lines in _chunks(stream, TASK_CHARS):
            writer.write(_encode_local(tok, lines, dtype))
        return
    # A bounded window of in-flight tasks (Pool.imap would read the whole corpus ahead).
    # Plain text files are handed out as byte ranges: streaming them through datasets in
    # this process costs about as much CPU as tokenizing, and on few cores that halves
    # throughput. Results are collected in order, so the shards are identical either way.
    pending = collections.deque()
    files = getattr(stream, "plain_files", None)
    tasks = ((_encode_range_task, (*r, dtype.str)) for r in byte_ranges(files, 4 * TASK_CHARS)) \
        if files else ((_encode_task, (lines, dtype.str)) for lines in _chunks(stream, TASK_CHARS))
    for fn, task_args in tasks:
        pending.append(pool.apply_async(fn, task_args))
        while len(pending) >= window:
            writer.write(pending.popleft().get())
    while pending:
        writer.write(pending.popleft().get())


def _carve(shards: list[dict], plan: list[tuple[str, float]]) -> dict[str, dict]:
    """Cut a stream's concatenated shards into consecutive splits by token fraction."""
    total = sum(s["num_tokens"] for s in shards)
    cuts, acc = [0], 0.0
    for _, frac in plan:
        acc += frac
        cuts.append(min(total, int(round(total * acc))))
    cuts[-1] = total
    out = {}
    for (split, _), lo, hi in zip(plan, cuts[:-1], cuts[1:]):
        segs, base = [], 0
        for s in shards:
            a, b = max(lo, base), min(hi, base + s["num_tokens"])
            if a < b:
                segs.append({"file": s["file"], "offset": a - base, "length": b - a})
            base += s["num_tokens"]
        out[split] = {"num_tokens": hi - lo, "segments": segs}
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out_dir: Path) -> None:
    for p in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if not _pid_alive(pid) or pid == os.getpid():
            shutil.rmtree(p, ignore_errors=True)


def read_meta(out_dir: Path) -> dict | None:
    path = Path(out_dir) / "meta.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        raise DataError(f"{path} is unreadable or corrupt; delete {out_dir} and prepare again") from None
    if not isinstance(meta, dict) or "format" not in meta:
        raise DataError(f"{out_dir} is damaged: its meta.json has no 'format'; delete it and prepare again")
    if meta["format"] != FORMAT:
        raise DataError(f"{out_dir} was prepared by an incompatible version ({meta['format']}); "
                        "prepare it again into a new directory")
    _check_meta(meta, out_dir)
    return meta


def _check_meta(meta: dict, out_dir) -> None:
    """Every entry that loading reads, present and of the right type, so a damaged meta.json ends in
    one DataError naming the directory and the key instead of a KeyError deep in the loader."""
    def damaged(what: str) -> DataError:
        return DataError(f"{out_dir} is damaged: its meta.json {what}; delete it and prepare again")

    def need(obj: dict, key: str, kind, where: str = ""):
        if key not in obj:
            raise damaged(f"has no {key!r}{where}")
        value = obj[key]
        ok = (isinstance(value, int) and not isinstance(value, bool) and value >= 0) if kind is int \
            else isinstance(value, kind)
        if not ok:
            name = "a non-negative integer" if kind is int else f"a {kind.__name__}"
            raise damaged(f"has {key!r}{where} = {value!r}, not {name}")
        return value

    if need(meta, "dtype", str) not in ("uint16", "uint32"):
        raise damaged(f"has 'dtype' = {meta['dtype']!r}, not uint16 or uint32")
    need(meta, "vocab_size", int)
    need(meta, "num_tokens", int)
    tok = need(meta, "tokenizer", dict)
    for key in ("kind", "file", "name"):
        need(tok, key, str, " in 'tokenizer'")
    lengths = {}
    for i, shard in enumerate(need(meta, "shards", list)):
        where = f" in shards[{i}]"
        if not isinstance(shard, dict):
            raise damaged(f"has shards[{i}] = {shard!r}, not an object")
        lengths[need(shard, "file", str, where)] = need(shard, "num_tokens", int, where)
    for name, split in need(meta, "splits", dict).items():
        if not isinstance(split, dict):
            raise damaged(f"has splits[{name!r}] = {split!r}, not an object")
        need(split, "num_tokens", int, f" in splits[{name!r}]")
        for j, seg in enumerate(need(split, "segments", list, f" in splits[{name!r}]")):
            where = f" in splits[{name!r}].segments[{j}]"
            if not isinstance(seg, dict):
                raise damaged(f"has {where[4:]} = {seg!r}, not an object")
            file = need(seg, "file", str, where)
            end = need(seg, "offset", int, where) + need(seg, "length", int, where)
            if file not in lengths:
                raise damaged(f"names shard {file!r}{where}, which is not among its shards")
            if end > lengths[file]:
                raise damaged(f"has {where[4:]} ending at token {end}, past the {lengths[file]} tokens "
                              f"of {file}")


def check_token_ids(path, ids: np.ndarray, vocab_size: int) -> None:
    """Raise DataError if any id in ``ids`` (a shard) is ``>= vocab_size``: a shard overwritten or
    mixed up with another corpus would otherwise surface as an index error inside the embedding, or,
    on a GPU, as a device-side assert that names nothing. Cost: one read of the shard, in steps of
    ``SCAN_TOKENS`` ids so memory stays bounded whatever its size; about 0.1 s per GB from the page
    cache, disk speed on a cold cache (which it warms for training)."""
    for lo in range(0, len(ids), SCAN_TOKENS):
        chunk = ids[lo:lo + SCAN_TOKENS]
        if int(chunk.max()) >= vocab_size:
            at = int(np.argmax(chunk >= vocab_size))
            raise DataError(f"shard {path} holds token id {int(chunk[at])} at position {lo + at}, not below the "
                            f"vocabulary size {vocab_size}; the shard is corrupt: delete its directory and "
                            "prepare again")


def request_key(corpus: Corpus, tokenizer: str, vocab_size: int) -> tuple[dict, str]:
    tok_req = ({"kind": "sentencepiece", "vocab_size": vocab_size} if tokenizer == "sentencepiece"
               else {"kind": "named", "name": resolve_tokenizer(tokenizer).name})
    req = {"format": FORMAT, "corpus": corpus.key, "tokenizer": tok_req}
    return req, hashlib.sha256(json.dumps(req, sort_keys=True).encode()).hexdigest()[:24]


def prepare(corpus: Corpus, out_dir, *, tokenizer: str = "sentencepiece", vocab_size: int = 4096,
            cache_dir="~/.cache/megatie", num_workers: int | None = None,
            shard_tokens: int = SHARD_TOKENS, log=None) -> Path:
    """Tokenize ``corpus`` into ``out_dir``; a cache hit if it already holds this request."""
    out_dir = Path(os.path.expanduser(str(out_dir))).absolute()
    req, key = request_key(corpus, tokenizer, vocab_size)
    meta = read_meta(out_dir)
    if meta is not None:
        if meta.get("request_key") == key:
            return out_dir
        raise DataError(f"{out_dir} already holds different prepared data ({meta.get('description')}); "
                        "choose another --out-dir or delete it")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"{out_dir} exists and is not a prepared data directory; "
                        "choose a new or empty --out-dir")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out_dir)
    stage = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    stage.mkdir()
    t0 = time.time()
    try:
        tok = resolve_tokenizer(tokenizer)
        if tok is None:
            sample = sample_lines(corpus)
            if not sample:
                raise DataError(f"the corpus is empty ({corpus.description}); pass files with text in them")
            tok = train_sentencepiece(sample, vocab_size, cache_dir)
        if isinstance(tok, SentencePieceTokenizer):
            shutil.copyfile(tok.model_file, stage / "tokenizer.model")
            tok_meta = {"kind": "sentencepiece", "file": "tokenizer.model"}
        else:
            tok.tok.save_pretrained(stage / "tokenizer")
            tok_meta = {"kind": "hf", "file": "tokenizer"}
        tok_meta.update(name=tok.name, vocab_size=tok.vocab_size)
        dtype = dtype_for(tok.vocab_size)
        if num_workers is None:
            # Starting spawn workers costs about a second each: not worth it for small corpora.
            small = corpus.size_bytes is not None and corpus.size_bytes < SMALL_CORPUS
            num_workers = 0 if small else (os.cpu_count() or 1)
        workers = num_workers
        pool = None
        if workers > 0:
            # spawn: the caller may hold threads (torch, datasets) that fork would copy unsafely.
            pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker,
                                                initargs=(tok.spec(),))
        shards, splits = [], {}
        try:
            for name, stream in corpus.streams.items():
                w = _ShardWriter(stage, name, dtype, shard_tokens)
                _tokenize_stream(stream, w, tok, dtype, pool, window=2 * max(workers, 1))
                s = w.close()
                if not s or sum(x["num_tokens"] for x in s) == 0:
                    if name in corpus.required or name == corpus.sample_stream:
                        raise DataError(f"the corpus is empty ({corpus.description}, {name} part); "
                                        "pass files with text in them")
                    continue
                shards += s
                splits.update(_carve(s, corpus.carve[name]))
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
        meta = {
            "format": FORMAT, "request": req, "request_key": key,
            "description": corpus.description, "dtype": dtype.name,
            "vocab_size": tok.vocab_size, "tokenizer": tok_meta,
            "num_tokens": sum(s["num_tokens"] for s in shards),
            "sources": corpus.identity, "shards": shards, "splits": splits,
            "required_splits": list(corpus.required),
            "seconds": round(time.time() - t0, 3),
        }
        tmp = stage / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
        os.replace(tmp, stage / "meta.json")
        if out_dir.exists():
            out_dir.rmdir()        # empty (checked above); rename cannot replace it portably
        os.rename(stage, out_dir)
        if log:
            log(f"prepared {meta['num_tokens']} tokens into {out_dir} in {meta['seconds']:.1f}s")
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return out_dir


def open_tokens(out_dir) -> tuple[dict, object, dict[str, list[np.ndarray]]]:
    """Load a prepared directory: (meta, tokenizer, split -> list of zero-copy memmap views)."""
    out_dir = Path(os.path.expanduser(str(out_dir)))
    meta = read_meta(out_dir)
    if meta is None:
        hint = " (an interrupted preparation leaves no meta.json)" if out_dir.exists() else ""
        raise DataError(f"{out_dir} is not a prepared data directory{hint}; "
                        "run launchers/prepare_data.py --out-dir on it or pass the text instead")
    dtype = np.dtype(meta["dtype"])
    maps = {}
    for s in meta["shards"]:
        path = out_dir / s["file"]
        want = s["num_tokens"] * dtype.itemsize
        try:
            size = path.stat().st_size
        except OSError:
            raise DataError(f"shard {path} is missing; delete {out_dir} and prepare again") from None
        if size != want:
            raise DataError(f"shard {path} has {size} bytes but meta.json says {want}; "
                            f"delete {out_dir} and prepare again")
        maps[s["file"]] = (np.memmap(path, dtype=dtype, mode="r") if want
                           else np.zeros(0, dtype=dtype))
        # Once per shard per open: every process that trains on the data (each rank) checks it.
        check_token_ids(path, maps[s["file"]], meta["vocab_size"])
    splits = {name: [maps[g["file"]][g["offset"]:g["offset"] + g["length"]] for g in sp["segments"]]
              for name, sp in meta["splits"].items()}
    t = meta["tokenizer"]
    spec = ({"kind": "sentencepiece", "path": str(out_dir / t["file"])} if t["kind"] == "sentencepiece"
            else {"kind": "hf", "path": str(out_dir / t["file"])})
    tok = load_tokenizer(spec)
    tok.name = t["name"]   # the identity it was prepared with, not the copy's path
    return meta, tok, splits
