#!/usr/bin/env python
"""Preparation and loading at the One Billion Word scale, measured end to end.

    python benchmarks/make_lm1b_standin.py --out /data/lm1b --words 1e9 --text wikitext2-valid.txt wikitext2-test.txt
    python benchmarks/lm1b_scale.py --dataset-dir /data/lm1b --workdir /data/bench --kills 2 --out lm1b_scale.json

1. ``launchers/prepare_data.py --dataset lm1b --dataset-dir DIR`` in a child process: wall time,
   tokens/s, peak resident memory of its whole process tree (sampled), disk used by the shards.
2. ``--kills N``: the same command again into a second directory, ``kill -9`` of its process group at N
   seeded moments (each after it has journaled new work), then once more to the end; every shard's
   SHA-256 against the uninterrupted run's.
3. Loading: in a fresh process per corpus, the start-up (opening the prepared directory and making the
   train loader) and the time per [batch, seq_len] batch, for the big corpus and for a 10M-word one
   prepared from the first training files, so the two can be compared.

Prepared directories are deleted at the end unless ``--keep``; the text in DIR is never touched.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from data_pipeline import run_measured  # noqa: E402

PREPARE = ROOT / "launchers" / "prepare_data.py"


def _prepare_cmd(dataset_dir, out, cache, vocab) -> list[str]:
    return [sys.executable, str(PREPARE), "--dataset", "lm1b", "--dataset-dir", str(dataset_dir),
            "--out-dir", str(out), "--cache-dir", str(cache), "--vocab-size", str(vocab), "--no-progress"]


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def shard_digests(d: Path) -> dict[str, str]:
    out = {}
    for p in sorted(d.glob("*.bin")):
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        out[p.name] = h.hexdigest()
    return out


def measure_prepare(dataset_dir, out, cache, vocab) -> dict:
    r = run_measured(_prepare_cmd(dataset_dir, out, cache, vocab), timeout=4 * 3600)
    info = json.loads(r["stdout"].strip().splitlines()[-1])
    meta = json.loads((out / "meta.json").read_text())
    text = sum(s["size"] for part in ("train", "valid") for s in meta["sources"][part])
    shards = _dir_bytes(out)
    return {"text_bytes": text, "tokens": info["num_tokens"], "prepare_s": round(r["wall_s"], 1),
            "tokens_per_second": round(info["num_tokens"] / r["wall_s"]), "peak_rss_mb": round(r["peak_rss_mb"]),
            "shard_bytes": shards, "bytes_per_token": round(shards / info["num_tokens"], 3)}


def _journal_tasks(stage: Path) -> int:
    try:
        j = json.loads((stage / "progress.json").read_text())
    except (OSError, ValueError):
        return -1
    return j["current"]["tasks"] if j["current"] else 1 << 30


def killed_and_resumed(dataset_dir, out, cache, vocab, kills: int, full_s: float, seed: int = 0) -> dict:
    rng, stage, moments = random.Random(seed), out.parent / f".{out.name}.partial", []
    t0 = time.time()
    for _ in range(kills):
        before = _journal_tasks(stage)
        p = subprocess.Popen(_prepare_cmd(dataset_dir, out, cache, vocab), start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while _journal_tasks(stage) <= before and p.poll() is None:
            time.sleep(0.2)
        time.sleep(rng.uniform(0.05, 0.25) * full_s)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        moments.append({"tasks_journaled": _journal_tasks(stage)})
    r = subprocess.run(_prepare_cmd(dataset_dir, out, cache, vocab), capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return {"kills": moments, "continued": "continuing the interrupted preparation" in r.stderr,
            "total_s_with_kills": round(time.time() - t0, 1)}


def loader_child(data_dir: str, batch: int, seq_len: int, batches: int) -> None:
    t0 = time.perf_counter()
    from megatie.data import build_lm_data
    t1 = time.perf_counter()
    data = build_lm_data(data_dir=data_dir, seq_len=seq_len)
    loader = data.train_loader(batch, seed=0)
    t2 = time.perf_counter()
    s = time.perf_counter()
    next(loader)      # the first batch also draws the epoch's permutation of all sequences
    first = time.perf_counter() - s
    times = []
    for _ in range(batches):
        s = time.perf_counter()
        next(loader)
        times.append(time.perf_counter() - s)
    print(json.dumps({"import_s": round(t1 - t0, 3), "startup_s": round(t2 - t1, 4),
                      "first_batch_ms": round(first * 1e3, 2),
                      "batch_ms_median": round(statistics.median(times) * 1e3, 4),
                      "batch_ms_p90": round(sorted(times)[int(0.9 * len(times))] * 1e3, 4),
                      "train_tokens": data.num_tokens("train")}))


def measure_loader(data_dir: Path, batch: int, seq_len: int, batches: int, repeats: int = 3) -> dict:
    runs = []
    for _ in range(repeats):
        r = subprocess.run([sys.executable, __file__, "--child-loader", str(data_dir), str(batch), str(seq_len),
                            str(batches)], capture_output=True, text=True, check=True)
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    best = {k: min(r[k] for r in runs) for k in ("startup_s", "first_batch_ms", "batch_ms_median", "batch_ms_p90")}
    return {**best, "train_tokens": runs[0]["train_tokens"], "repeats": repeats}


def small_release(dataset_dir: Path, work: Path, words: int) -> Path:
    """The first training files (about ``words`` words) and the same validation file, linked."""
    small = work / "small-release"
    tdir, hdir = small / "training-monolingual.tokenized.shuffled", small / "heldout-monolingual.tokenized.shuffled"
    tdir.mkdir(parents=True)
    hdir.mkdir()
    total = 0
    for p in sorted((dataset_dir / tdir.name).glob("news.en-*-of-00100")):
        os.symlink(p, tdir / p.name)
        total += p.stat().st_size / 6.5     # bytes per word, roughly: enough to pick the file count
        if total >= words:
            break
    os.symlink(dataset_dir / hdir.name / "news.en.heldout-00000-of-00050", hdir / "news.en.heldout-00000-of-00050")
    return small


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset-dir", help="the release layout (real, or made by make_lm1b_standin.py)")
    ap.add_argument("--workdir", required="--child-loader" not in (argv or sys.argv))
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--kills", type=int, default=0, help="kill -9 this many times in a second preparation")
    ap.add_argument("--small-words", type=float, default=1e7)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batches", type=int, default=2000)
    ap.add_argument("--keep", action="store_true", help="keep the prepared directories")
    ap.add_argument("--out", default="lm1b_scale.json")
    ap.add_argument("--child-loader", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_loader:
        d, b, s, n = args.child_loader
        loader_child(d, int(b), int(s), int(n))
        return 0
    dataset_dir, work = Path(args.dataset_dir).absolute(), Path(args.workdir).absolute()
    work.mkdir(parents=True, exist_ok=True)
    cache, big = work / "cache", work / "prepared"
    result = {"dataset_dir": str(dataset_dir), "cpu_count": os.cpu_count(), "vocab_size": args.vocab_size}
    try:
        result["prepare"] = measure_prepare(dataset_dir, big, cache, args.vocab_size)
        print(json.dumps(result["prepare"]), flush=True)
        if args.kills:
            again = work / "prepared-killed"
            result["resume"] = killed_and_resumed(dataset_dir, again, cache, args.vocab_size, args.kills,
                                                  result["prepare"]["prepare_s"])
            want, got = shard_digests(big), shard_digests(again)
            result["resume"].update(shards=len(want), identical=sum(got.get(k) == v for k, v in want.items()),
                                    sha256=want)
            shutil.rmtree(again, ignore_errors=True)
            print(json.dumps(result["resume"]), flush=True)
        small = work / "prepared-small"
        subprocess.run(_prepare_cmd(small_release(dataset_dir, work, int(args.small_words)), small, cache,
                                    args.vocab_size), check=True, capture_output=True)
        result["loader"] = {name: measure_loader(d, args.batch, args.seq_len, args.batches)
                            for name, d in (("small", small), ("big", big))}
        lo = result["loader"]
        result["loader"]["batch_time_ratio_big_over_small"] = round(lo["big"]["batch_ms_median"] /
                                                                    lo["small"]["batch_ms_median"], 3)
        result["loader"]["startup_ratio_big_over_small"] = round(lo["big"]["startup_s"] / lo["small"]["startup_s"], 3)
        print(json.dumps(result["loader"]), flush=True)
    finally:
        if not args.keep:
            for d in ("prepared", "prepared-killed", "prepared-small", "small-release", "cache"):
                shutil.rmtree(work / d, ignore_errors=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
