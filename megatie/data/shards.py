"""Streaming, parallel, atomic and resumable preparation of token shards.

Layout of a prepared directory D::

    D/meta.json            written last; its presence is what makes D complete
    D/tokenizer.model      (SentencePiece) or D/tokenizer/ (transformers), so D is self-contained
    D/<stream>-00000.bin   raw token ids, uint16 when the vocabulary fits, else uint32

Everything is written into a sibling staging directory ``.D.partial`` (locked by the process that
writes it) that is renamed onto D only when complete, so an interrupted run can never leave a
directory that looks prepared; the same command run again continues where the journal in the
staging directory says the interrupted one stopped (``journal.py``). Text is read and written in
bounded batches, so peak memory does not grow with the corpus. Reading a prepared directory is
``prepared.py``.
"""
from __future__ import annotations

import collections
import errno
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from megatie.data.journal import JOURNAL, Journal, ShardWriter
from megatie.data.prepared import FORMAT, read_meta
from megatie.data.sources import Corpus, byte_ranges, read_range, sample_lines
from megatie.data.tokenizers import (
    SentencePieceTokenizer,
    load_tokenizer,
    resolve_tokenizer,
    train_sentencepiece,
)
from megatie.errors import DataError
from megatie.runtime.runlock import LOCK_NAME, RunLock, RunLockedError

SHARD_TOKENS = 1 << 27          # 128M tokens: 256 MB per uint16 shard
SMALL_CORPUS = 16 << 20         # bytes of text below which tokenizing in-process is faster
TASK_CHARS = 1 << 20            # text per worker task; large enough to amortise IPC
_WORKER_TOK = None


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def _init_worker(spec):
    global _WORKER_TOK
    _WORKER_TOK = load_tokenizer(spec)


def _flatten(ids: list[list[int]], dtype) -> np.ndarray:
    return np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype,
                       count=sum(len(x) for x in ids))


def _piece_lines(piece) -> list[str]:
    return read_range(*piece[1:]) if piece[0] == "range" else piece[1]


def _encode_piece(piece, dtype_str):
    """In a worker: one thread each, the workers are the parallelism."""
    return _flatten(_WORKER_TOK.encode_lines(_piece_lines(piece), num_threads=1), np.dtype(dtype_str))


def _encode_local(tok, lines, dtype):
    return _flatten(tok.encode_lines(lines), dtype)


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


def _pieces(stream):
    """``(piece, text bytes)`` per task, cut the same way whatever the number of workers (a resumed
    run counts finished tasks). Plain text files are handed out as byte ranges that a worker reads
    itself: streaming them through datasets in this process costs about as much CPU as tokenizing,
    and on few cores that halves throughput."""
    files = getattr(stream, "plain_files", None)
    if files:
        for path, start, end in byte_ranges(files, 4 * TASK_CHARS):
            yield ("range", path, start, end), end - start
    else:
        for lines in _chunks(stream, TASK_CHARS):
            yield ("lines", lines), sum(len(x.encode()) + 1 for x in lines)


def _tokenize_stream(stream, writer, tok, dtype, pool, window, skip, on_task):
    """Tokenize the stream's tasks after the first ``skip`` into ``writer``, in order (so the shards
    are identical with any number of workers), calling ``on_task(text_bytes)`` after each."""
    pieces = itertools.islice(_pieces(stream), skip, None)
    if pool is None:
        for piece, nbytes in pieces:
            writer.write(_encode_local(tok, _piece_lines(piece), dtype))
            on_task(nbytes)
        return
    # A bounded window of in-flight tasks (Pool.imap would read the whole corpus ahead).
    pending = collections.deque()
    for piece, nbytes in pieces:
        pending.append((pool.apply_async(_encode_piece, (piece, dtype.str)), nbytes))
        while len(pending) >= window:
            result, done = pending.popleft()
            writer.write(result.get())
            on_task(done)
    while pending:
        result, done = pending.popleft()
        writer.write(result.get())
        on_task(done)


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


def request_key(corpus: Corpus, tokenizer: str, vocab_size: int) -> tuple[dict, str]:
    tok_req = ({"kind": "sentencepiece", "vocab_size": vocab_size} if tokenizer == "sentencepiece"
               else {"kind": "named", "name": resolve_tokenizer(tokenizer).name})
    tok_req["tokenization"] = "text"  # every new preparation (data prepared before used ``lines``)
    req = {"format": FORMAT, "corpus": corpus.key, "tokenizer": tok_req}
    return req, hashlib.sha256(json.dumps(req, sort_keys=True).encode()).hexdigest()[:24]


def prepare(corpus: Corpus, out_dir, *, tokenizer: str = "sentencepiece", vocab_size: int = 4096,
            cache_dir="~/.cache/megatie", num_workers: int | None = None,
            shard_tokens: int = SHARD_TOKENS, log=None, progress: bool = False, wait: bool = False) -> Path:
    """Tokenize ``corpus`` into ``out_dir``; a cache hit if it already holds this request, and a
    continuation if an earlier run of the same request was interrupted (see ``journal``). Another live
    process preparing the same directory is an error, or with ``wait`` (training runs sharing a cache)
    waited for: its result is used, or its work continued if it stops without finishing."""
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
    stage = out_dir.parent / f".{out_dir.name}.partial"
    lock = _lock_stage(stage, out_dir, wait)
    if lock is None:                     # prepared meanwhile by the process we waited for
        return prepare(corpus, out_dir, tokenizer=tokenizer, vocab_size=vocab_size, cache_dir=cache_dir)
    try:
        journal = Journal(stage, key)
        if not journal.load():
            _empty_dir(stage)
        elif log:
            log(f"continuing the interrupted preparation of {out_dir} ({journal.bytes_done()} bytes of text done)")
        t0 = time.time()
        tok, tok_meta = _stage_tokenizer(corpus, tokenizer, vocab_size, cache_dir, stage, journal)
        shards, splits = _tokenize_all(corpus, tok, stage, journal, num_workers, shard_tokens, progress)
        meta = {
            "format": FORMAT, "request": req, "request_key": key,
            "description": corpus.description, "dtype": dtype_for(tok.vocab_size).name,
            "vocab_size": tok.vocab_size, "tokenizer": tok_meta,
            "num_tokens": sum(s["num_tokens"] for s in shards),
            "sources": corpus.identity, "shards": shards, "splits": splits,
            "required_splits": list(corpus.required),
            "seconds": round(time.time() - t0, 3),
        }
        _seal(stage, out_dir, meta)
    except DataError as exc:
        if not getattr(exc, "resumable", False):
            shutil.rmtree(stage, ignore_errors=True)   # bad input: nothing worth keeping
        raise
    finally:
        lock.release()
    if log:
        log(f"prepared {meta['num_tokens']} tokens into {out_dir} in {meta['seconds']:.1f}s")
    return out_dir


def _lock_stage(stage: Path, out_dir: Path, wait: bool) -> RunLock | None:
    while True:
        stage.mkdir(exist_ok=True)
        try:
            lock = RunLock(str(stage)).acquire()
            if read_meta(out_dir) is None:
                return lock
            # Sealed by the process we waited for between our last look and our lock: use its result.
            lock.release()
            shutil.rmtree(stage, ignore_errors=True)
            return None
        except RunLockedError:
            if not wait:
                raise DataError(f"another process is preparing {out_dir} (its lock: {stage / LOCK_NAME}); wait "
                                "for it to finish or choose another --out-dir") from None
        except FileNotFoundError:   # the other process sealed and renamed the stage just now
            pass
        if read_meta(out_dir) is not None:
            return None
        time.sleep(1.0)


def _empty_dir(stage: Path) -> None:
    for p in stage.iterdir():
        if p.name != LOCK_NAME:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def _stage_tokenizer(corpus, tokenizer, vocab_size, cache_dir, stage, journal):
    """The tokenizer, trained (on a bounded sample) or resolved once and kept in the staging directory."""
    if journal.tokenizer is not None:
        t = journal.tokenizer
        tok = load_tokenizer({"kind": t["kind"], "path": str(stage / t["file"]),
                              "tokenization": t.get("tokenization", "lines")})
        tok.name = t["name"]
        return tok, t
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
    tok_meta.update(name=tok.name, vocab_size=tok.vocab_size, tokenization=tok.tokenization)
    journal.record_tokenizer(tok_meta)
    return tok, tok_meta


def _tokenize_all(corpus, tok, stage, journal, num_workers, shard_tokens, progress):
    dtype = dtype_for(tok.vocab_size)
    if num_workers is None:
        # Starting spawn workers costs about a second each: not worth it for small corpora.
        small = corpus.size_bytes is not None and corpus.size_bytes < SMALL_CORPUS
        num_workers = 0 if small else (os.cpu_count() or 1)
    pool = None
    if num_workers > 0:
        # spawn: the caller may hold threads (torch, datasets) that fork would copy unsafely.
        pool = mp.get_context("spawn").Pool(num_workers, initializer=_init_worker, initargs=(tok.spec(),))
    bar = tqdm(total=corpus.size_bytes, initial=journal.bytes_done(), unit="B", unit_scale=True,
               desc="tokenizing", disable=not progress, file=sys.stderr, smoothing=0.05)
    shards, splits = [], {}
    try:
        for name, stream in corpus.streams.items():
            done = journal.finished(name)
            if done is None:
                done = _tokenize_one(name, stream, tok, dtype, stage, journal, pool, num_workers,
                                     shard_tokens, bar)
            if not done or sum(x["num_tokens"] for x in done) == 0:
                if name in corpus.required or name == corpus.sample_stream:
                    raise DataError(f"the corpus is empty ({corpus.description}, {name} part); "
                                    "pass files with text in them")
                continue
            shards += done
            splits.update(_carve(done, corpus.carve[name]))
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        err = DataError(f"no space left to write {stage} ({exc.strerror}); free some space and run the same "
                        f"command again: it continues from the work already finished ({journal.bytes_done()} "
                        "bytes of text)")
        err.resumable = True
        raise err from None
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    return shards, splits


def _tokenize_one(name, stream, tok, dtype, stage, journal, pool, workers, shard_tokens, bar):
    tasks, text_bytes, recorded = journal.position(name)
    writer = ShardWriter(stage, name, dtype, shard_tokens, recorded)
    count = {"tasks": tasks, "bytes": text_bytes}

    def on_task(nbytes):
        count["tasks"] += 1
        count["bytes"] += nbytes
        bar.update(nbytes)
        journal.record_task(name, count["tasks"], count["bytes"], writer)

    _tokenize_stream(stream, writer, tok, dtype, pool, 2 * max(workers, 1), tasks, on_task)
    shards = writer.close()
    journal.record_stream(name, shards, count["bytes"])
    return shards


def _seal(stage: Path, out_dir: Path, meta: dict) -> None:
    """meta.json last, then one rename with the lock still inside: a directory that looks prepared is
    complete, and a process waiting for the lock can only get it once the prepared directory exists."""
    tmp = stage / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
    os.replace(tmp, stage / "meta.json")
    if out_dir.exists():
        out_dir.rmdir()        # empty (checked above); rename cannot replace it portably
    os.rename(stage, out_dir)
    (out_dir / JOURNAL).unlink()
    (out_dir / LOCK_NAME).unlink()
