"""Write a stand-in for the One Billion Word Benchmark in its release's own layout, from real text.

    python benchmarks/make_lm1b_standin.py --out /data/lm1b-standin --words 1e9 \
        --text wikitext2-valid.txt wikitext2-test.txt

It is for measuring preparation and loading at the real corpus's size - throughput, memory, disk - and
**not** for model quality: its sentences are drawn, with a fixed seed, from a small pool of real English
(the given files, else Python's documentation text), some spliced at a word boundary with another, so
the vocabulary and the redundancy are those of the pool, not of news text. The layout is the release's:

    DIR/training-monolingual.tokenized.shuffled/news.en-000NN-of-00100     NN = 01..99
    DIR/heldout-monolingual.tokenized.shuffled/news.en.heldout-000NN-of-00050   NN = 00..49

one sentence per line, each held-out file 1/50 the size of a training file. The same arguments
always write the same bytes. Delete DIR when done: at 1e9 words it is about 6 GB.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TRAIN_FILES, HELDOUT_FILES = 99, 50
POOL = 1 << 20          # recombined sentences drawn from; large enough that no file repeats a pattern
LINES_PER_WRITE = 1 << 16
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def sentences_of(texts: list[str]) -> list[str]:
    out = []
    for text in texts:
        # Paragraphs are separated by blank lines; hard-wrapped lines inside one are joined.
        for para in re.split(r"\n\s*\n", text):
            para = " ".join(para.split())
            if para.startswith("=") or len(para) < 20:   # headings, fragments
                continue
            out += [s.strip() for s in SENTENCE_END.split(para) if len(s.split()) >= 4]
    return out


def recombined_pool(sentences: list[str], size: int, rng: np.random.Generator) -> tuple[list[bytes], np.ndarray]:
    """``size`` lines: a random sentence, or (half the time) the head of one spliced onto the tail of
    another at a word boundary; returned as encoded lines and their word counts."""
    words = [s.split() for s in sentences]
    a = rng.integers(len(words), size=size)
    b = rng.integers(len(words), size=size)
    splice = rng.random(size) < 0.5
    cut = rng.random(size)
    lines, counts = [], np.empty(size, dtype=np.int64)
    for i in range(size):
        w = words[a[i]]
        if splice[i]:
            other = words[b[i]]
            w = w[:max(1, int(len(w) * cut[i]))] + other[int(len(other) * cut[i]):]
        lines.append((" ".join(w) + "\n").encode())
        counts[i] = len(w)
    return lines, counts


def write_file(path: Path, lines: list[bytes], counts: np.ndarray, words: int, rng) -> int:
    written = 0
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        while written < words:
            idx = rng.integers(len(lines), size=LINES_PER_WRITE)
            take = np.searchsorted(np.cumsum(counts[idx]), words - written) + 1
            idx = idx[:take]
            f.write(b"".join(lines[i] for i in idx))
            written += int(counts[idx].sum())
    os.replace(tmp, path)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory to create (must not exist)")
    ap.add_argument("--words", type=float, default=1e9, help="training words in all (default 1e9)")
    ap.add_argument("--text", nargs="*", default=[], help="real text to draw sentences from "
                    "(default: Python's documentation topics)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        print(f"error: {out} exists; choose a new directory", file=sys.stderr)
        return 2
    if args.text:
        texts = [Path(t).read_text(encoding="utf-8") for t in args.text]
    else:
        from megatie.data.sources import default_corpus_text
        texts = default_corpus_text()
    sentences = sentences_of(texts)
    if len(sentences) < 100:
        print(f"error: only {len(sentences)} sentences in the given text; give more text", file=sys.stderr)
        return 2
    t0 = time.time()
    rng = np.random.default_rng(args.seed)
    lines, counts = recombined_pool(sentences, POOL, rng)
    per_file = int(args.words) // TRAIN_FILES + 1
    train_dir = out / "training-monolingual.tokenized.shuffled"
    held_dir = out / "heldout-monolingual.tokenized.shuffled"
    train_dir.mkdir(parents=True)
    held_dir.mkdir()
    total = 0
    for n in range(1, TRAIN_FILES + 1):
        total += write_file(train_dir / f"news.en-{n:05d}-of-00100", lines, counts, per_file, rng)
        if sys.stderr.isatty():
            print(f"\rtraining file {n}/{TRAIN_FILES}: {total / 1e6:.0f}M words", end="", file=sys.stderr, flush=True)
    held = sum(write_file(held_dir / f"news.en.heldout-{n:05d}-of-00050", lines, counts,
                          max(per_file // 50, 1), rng) for n in range(HELDOUT_FILES))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(json.dumps({"out": str(out), "train_words": total, "heldout_words": held, "bytes": size,
                      "source_sentences": len(sentences), "seconds": round(time.time() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
