#!/usr/bin/env python
"""Tokenize a corpus into memory-mapped shards that training reads with --data-dir.

    python launchers/prepare_data.py --train-file 'corpus/*.txt' --out-dir data/mycorpus
    python launchers/prepare_data.py --dataset wikitext-2 --tokenizer gpt2 --out-dir data/wt2
    python launchers/prepare_data.py --dataset lm1b --dataset-dir 1-billion-word-language-modeling-benchmark-r13output \
        --out-dir data/lm1b

A second run on unchanged input is a cache hit; an interrupted run (Ctrl-C, kill -9, a full disk) is
continued by running the same command again. Problems with the input print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block and then the message
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def main(argv=None) -> int:
    ap = _Parser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--train-file", nargs="+", action="extend", metavar="F",
                     help="text files or globs (.txt, .jsonl with a \"text\" field, .gz of either)")
    src.add_argument("--dataset", help="wikitext-2, wikitext-103, lambada or lm1b (needs the hub "
                     "or a local Hugging Face cache)")
    ap.add_argument("--dataset-dir", metavar="DIR", help="with --dataset lm1b: the extracted "
                    "1-billion-word-language-modeling-benchmark-r13output directory (the release's own layout)")
    ap.add_argument("--valid-file", nargs="+", action="extend", metavar="F",
                    help="validation files; default: hold out the end of the training text")
    ap.add_argument("--holdout-fraction", type=float, default=0.05)
    ap.add_argument("--tokenizer", default="sentencepiece",
                    help="'sentencepiece' (trained on a corpus sample), 'gpt2', or a local path")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--cache-dir", default="~/.cache/megatie")
    ap.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: cores; 0: in this process)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if not 16 <= args.vocab_size <= 1 << 22:
        ap.error(f"--vocab-size must be in [16, {1 << 22}], got {args.vocab_size}")
    if not 0 < args.holdout_fraction < 1:
        ap.error(f"--holdout-fraction must be in (0, 1), got {args.holdout_fraction}")
    if args.workers is not None and args.workers < 0:
        ap.error(f"--workers must be at least 0 (0: in this process), got {args.workers}")
    # datasets imports torch (seconds, hundreds of MB) only to share state with DataLoader
    # workers; preparation never needs it.
    os.environ.setdefault("USE_TORCH", "0")

    from megatie.data.prepared import read_meta
    from megatie.data.shards import prepare
    from megatie.data.sources import make_corpus
    from megatie.errors import MegatieError

    try:
        t0 = time.time()
        corpus = make_corpus(args.train_file, args.valid_file, args.dataset, args.holdout_fraction, args.dataset_dir)
        hit = read_meta(args.out_dir) is not None
        out = prepare(corpus, args.out_dir, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                      cache_dir=args.cache_dir, num_workers=args.workers, progress=not args.no_progress,
                      log=lambda line: print(line, file=sys.stderr))
        meta = read_meta(out)
    except MegatieError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to continue where it stopped", file=sys.stderr)
        return 130
    splits = ", ".join(f"{k}={v['num_tokens']}" for k, v in sorted(meta["splits"].items()))
    print(json.dumps({"out_dir": str(out), "cache_hit": hit, "seconds": round(time.time() - t0, 2),
                      "tokenizer": meta["tokenizer"]["name"], "dtype": meta["dtype"],
                      "num_tokens": meta["num_tokens"], "splits": splits}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
