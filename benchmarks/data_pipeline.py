#!/usr/bin/env python
"""Data preparation throughput and memory, against datasets.map with the same tokenizer.

Corpora of growing size are built from real text (the files given with --text, their lines
repeated and shuffled with a fixed seed), then each size is prepared in a fresh child process
by launchers/prepare_data.py while the parent samples the resident memory of the child's whole
process tree (main + tokenizer workers). The baseline tokenizes the same file with
``datasets.load_dataset("text")`` + ``Dataset.map(batched=True)`` calling the same SentencePiece
model, also in a child. Sizes never share a process, so their peaks cannot contaminate each other.

    python benchmarks/data_pipeline.py --text valid.txt test.txt --quick --out bench.json
    python benchmarks/data_pipeline.py --text valid.txt test.txt --sizes 10M,100M --encoders
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}.get(s[-1], 1)
    return int(float(s[:-1] if s[-1] in "KMBG" else s) * mult)


def build_corpus(texts: list[str], words: int, path: Path, seed: int = 0) -> Path:
    """Lines of ``texts`` repeated, each pass shuffled; every size shares the same prefix."""
    if path.exists():
        return path
    lines = [l for t in texts for l in open(t, encoding="utf-8")]
    per_pass = sum(len(l.split()) for l in lines)
    rng = random.Random(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        done = 0
        while done < words:
            rng.shuffle(lines)
            if done + per_pass <= words:
                f.writelines(lines)
                done += per_pass
            else:
                for l in lines:
                    f.write(l)
                    done += len(l.split())
                    if done >= words:
                        break
    os.replace(tmp, path)
    return path


def _tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and its descendants (via /proc/*/task/*/children, which is
    cheap: scanning all of /proc would steal CPU from the 2-core run being measured)."""
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            pass
    return total


def run_measured(cmd: list[str], timeout: float) -> dict:
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while p.poll() is None:
        peak = max(peak, _tree_rss(p.pid))
        if time.time() - t0 > timeout:
            p.kill()
            raise RuntimeError(f"timed out: {' '.join(cmd)}")
        time.sleep(0.1)
    out, err = p.communicate()
    wall = time.time() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {err.strip()[-2000:]}")
    return {"wall_s": wall, "peak_rss_mb": peak / 2**20, "stdout": out}


def baseline_child(corpus: str, model: str, cache: str) -> None:
    """datasets.map tokenization of ``corpus``: the way it is usually done."""
    os.environ.setdefault("USE_TORCH", "0")   # as prepare_data does, so both skip importing torch
    import datasets
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model)
    eos = sp.eos_id()
    t0 = time.time()
    ds = datasets.load_dataset("text", data_files=[corpus], split="train", cache_dir=cache)

    def tok(batch):
        lines = [t.strip() for t in batch["text"] if t.strip()]
        ids = sp.encode(lines)
        for x in ids:
            x.append(eos)
        return {"input_ids": ids}

    out = ds.map(tok, batched=True, remove_columns=["text"], cache_file_name=os.path.join(cache, "tok.arrow"))
    import pyarrow.compute as pc

    n = sum(pc.sum(pc.list_value_length(b.column("input_ids"))).as_py()
            for b in out.with_format("arrow").iter(batch_size=100_000))
    print(json.dumps({"num_tokens": n, "seconds": time.time() - t0}))


def compare_encoders(corpus: Path, model_file: str, max_bytes: int = 64 << 20) -> dict:
    """SentencePiece (what preparation uses) against the Rust ``tokenizers`` unigram built from the same
    model (megatie's export path), both with every core, on the first ``max_bytes`` of ``corpus``:
    throughput and the share of lines whose ids are identical (preparation needs all of them)."""
    import sentencepiece as spm

    from megatie.data.hf_tokenizer import fast_from_sentencepiece

    with open(corpus, "rb") as f:
        lines = [ln.strip() for ln in f.read(max_bytes).decode("utf-8", "ignore").splitlines() if ln.strip()]
    size = sum(len(ln.encode()) + 1 for ln in lines)
    sp = spm.SentencePieceProcessor(model_file=model_file)
    t0 = time.perf_counter()
    sp_ids = sp.encode(lines, num_threads=os.cpu_count() or 1)
    sp_s = time.perf_counter() - t0
    fast = fast_from_sentencepiece(model_file)._tokenizer
    t0 = time.perf_counter()
    rust_ids = [e.ids for e in fast.encode_batch(lines, add_special_tokens=False)]
    rust_s = time.perf_counter() - t0
    same = sum(a == b for a, b in zip(sp_ids, rust_ids))
    return {"text_mb": round(size / 2**20, 1), "lines": len(lines),
            "sentencepiece_mb_per_s": round(size / 2**20 / sp_s, 2),
            "tokenizers_rust_mb_per_s": round(size / 2**20 / rust_s, 2),
            "rust_over_sentencepiece": round(sp_s / rust_s, 3),
            "lines_with_identical_ids": same, "identical_share": round(same / max(len(lines), 1), 6)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--text", nargs="+", required="--child-baseline" not in (argv or sys.argv),
                    help="real text files the corpora are built from")
    ap.add_argument("--sizes", default="10M,100M", help="corpus sizes in words, e.g. 10M,100M,1B")
    ap.add_argument("--baseline-sizes", default=None,
                    help="sizes that also run datasets.map (default: all but those over 100M)")
    ap.add_argument("--project", default="1B", help="size to project to from the two largest runs")
    ap.add_argument("--quick", action="store_true", help="5M,10M,20M words; finishes in minutes")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--workdir", default=None, help="where corpora and shards go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the workdir")
    ap.add_argument("--encoders", action="store_true", help="also compare SentencePiece with the Rust "
                    "tokenizers implementation of the same model (speed, identical ids)")
    ap.add_argument("--out", default="data_pipeline.json")
    ap.add_argument("--child-baseline", nargs=3, metavar=("CORPUS", "MODEL", "CACHE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_baseline:
        baseline_child(*args.child_baseline)
        return 0

    import tempfile

    from megatie.data.sources import file_corpus, sample_lines
    from megatie.data.tokenizers import train_sentencepiece

    sizes = [parse_size(s) for s in ("5M,10M,20M" if args.quick else args.sizes).split(",")]
    sizes.sort()
    base_sizes = ([parse_size(s) for s in args.baseline_sizes.split(",")] if args.baseline_sizes
                  else [s for s in sizes if s <= 100_000_000])
    work = Path(args.workdir or tempfile.mkdtemp(prefix="megatie-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    rows = []
    try:
        corpora = {n: build_corpus(args.text, n, work / f"corpus-{n}.txt") for n in sizes}
        for n in sizes:
            # Train the tokenizer outside the timings (prepare_data then finds it in the cache);
            # sizes beyond the sample size share the same sample, hence the same model.
            tok = train_sentencepiece(sample_lines(file_corpus([str(corpora[n])])),
                                      args.vocab_size, cache)
            out = work / f"prep-{n}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, str(ROOT / "launchers" / "prepare_data.py"), "--train-file",
                   str(corpora[n]), "--out-dir", str(out), "--cache-dir", str(cache),
                   "--vocab-size", str(args.vocab_size)]
            if args.workers is not None:
                cmd += ["--workers", str(args.workers)]
            r = run_measured(cmd, timeout=7200)
            info = json.loads(r["stdout"].strip().splitlines()[-1])
            row = {"words": n, "bytes": corpora[n].stat().st_size, "tokens": info["num_tokens"],
                   "prepare_s": round(r["wall_s"], 2),
                   "tokens_per_second": round(info["num_tokens"] / r["wall_s"]),
                   "peak_rss_mb": round(r["peak_rss_mb"], 1)}
            shutil.rmtree(out, ignore_errors=True)
            if n in base_sizes:
                bc = work / f"hf-{n}"
                shutil.rmtree(bc, ignore_errors=True)
                bc.mkdir()
                b = run_measured([sys.executable, __file__, "--child-baseline", str(corpora[n]),
                                  tok.model_file, str(bc)], timeout=7200)
                binfo = json.loads(b["stdout"].strip().splitlines()[-1])
                shutil.rmtree(bc, ignore_errors=True)
                row.update(map_s=round(b["wall_s"], 2), map_tokens=binfo["num_tokens"],
                           map_tokens_per_second=round(binfo["num_tokens"] / b["wall_s"]),
                           map_peak_rss_mb=round(b["peak_rss_mb"], 1),
                           speedup_vs_datasets_map=round(b["wall_s"] / r["wall_s"], 2))
            if args.encoders and n == sizes[-1]:
                row["encoders"] = compare_encoders(corpora[n], tok.model_file)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    big, small = rows[-1], rows[0]
    speedups = [r["speedup_vs_datasets_map"] for r in rows if "speedup_vs_datasets_map" in r]
    result = {
        "text": args.text, "sizes_words": sizes, "vocab_size": args.vocab_size,
        "cpu_count": os.cpu_count(), "rows": rows,
        "tokens_per_second": big["tokens_per_second"],
        "speedup_vs_datasets_map": speedups[-1] if speedups else None,
        "rss_growth": round(big["peak_rss_mb"] / small["peak_rss_mb"], 3),
    }
    target = parse_size(args.project) if args.project else None
    if target and target > sizes[-1]:
        b = rows[-1]
        result["projection"] = {
            "words": target, "method": "largest run's words/s, start-up included (conservative); "
                                       "RSS taken as flat",
            "prepare_s": round(b["prepare_s"] * target / b["words"], 1),
            "tokens": round(b["tokens"] / b["words"] * target),
            "shard_bytes": round(b["tokens"] / b["words"] * target) * (2 if args.vocab_size <= 65535 else 4),
            "peak_rss_mb": big["peak_rss_mb"],
        }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
