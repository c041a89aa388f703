"""Does a megatie run fine-tune? Held-out accuracy of `megatie finetune` against the majority class and
against the same model untrained.

The task is built from any English text, so it needs no download: each sentence of 6-40 words is
either kept as written (label 0) or has its words shuffled (label 1), half and half; the classifier
must tell real word order from a shuffle. With ``--keep-ends`` the first and last word stay in place,
which takes away the cheap cues (a capital or a full stop in the middle) and leaves word order alone.
Three rows, one run:

- majority: the share of the commonest training label among the held-out examples;
- untrained: the run's exact shape and tie map with freshly initialised weights, fine-tuned the same way;
- pretrained: the run's model (exported with `megatie export`), fine-tuned the same way.

    python benchmarks/finetune_accuracy.py --run runs/gpt2 --text-file my.txt --out r.json

The run and the text are the user's; everything else is written under a temporary directory and removed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from harness import scratch_dir  # noqa: E402


def word_order_examples(lines: list[str], count: int, seed: int, keep_ends: bool = False) -> list[dict]:
    """``count`` sentences, half with their words shuffled. With ``keep_ends`` the first and last word
    stay, so the capital letter and the final stop give nothing away: only the order of the words does."""
    rng = random.Random(seed)
    sentences = [s.strip() for line in lines for s in re.split(r"(?<=[.!?])\s+", line)]
    sentences = [s for s in sentences if 6 <= len(s.split()) <= 40 and len(set(s.split()[1:-1])) > 1]
    if len(sentences) < count:
        raise SystemExit(f"the text holds {len(sentences)} sentences of 6-40 words; {count} needed")
    rows = []
    for i, sentence in enumerate(rng.sample(sentences, count)):
        words = sentence.split()
        if i % 2:
            ends = 1 if keep_ends else 0
            inner = words[ends:len(words) - ends]
            while inner == words[ends:len(words) - ends]:
                rng.shuffle(inner)
            words = words[:ends] + inner + words[len(words) - ends:]
        rows.append({"text": " ".join(words), "label": i % 2})
    return rows


def untrained_twin(export_dir: str, out_dir: str, seed: int) -> None:
    """The export's config, tokenizer and tie map with freshly initialised weights."""
    import torch
    from transformers import AutoConfig, GPT2LMHeadModel

    torch.manual_seed(seed)
    GPT2LMHeadModel(AutoConfig.from_pretrained(export_dir)).save_pretrained(out_dir)
    for name in os.listdir(export_dir):
        if name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(os.path.join(export_dir, name), out_dir)


def _lines(text_file: str | None) -> list[str]:
    if text_file is None:
        from megatie.data.sources import default_corpus_text

        return [line for t in default_corpus_text() for line in t.splitlines()]
    with open(text_file, encoding="utf-8") as f:
        return f.read().splitlines()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a megatie run directory")
    p.add_argument("--text-file", help="English text to build the task from (default: the embedded corpus)")
    p.add_argument("--examples", type=int, default=2000)
    p.add_argument("--keep-ends", action="store_true", help="shuffle only the inner words of a sentence")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the result JSON here")
    args = p.parse_args()
    from megatie.tools.command import command_main

    rows = word_order_examples(_lines(args.text_file), args.examples, args.seed, args.keep_ends)
    results = {}
    with scratch_dir("megatie-finetune-") as tmp:
        labeled = os.path.join(tmp, "word_order.jsonl")
        with open(labeled, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        command_main(["export", args.run, os.path.join(tmp, "pretrained")])
        untrained_twin(os.path.join(tmp, "pretrained"), os.path.join(tmp, "untrained"), args.seed)
        for name in ("untrained", "pretrained"):
            start = time.perf_counter()
            command_main(["finetune", os.path.join(tmp, name), os.path.join(tmp, f"{name}-tuned"), "--train-file",
                          labeled, "--epochs", str(args.epochs), "--lr", str(args.lr), "--seed", str(args.seed),
                          "--no-progress"])
            with open(os.path.join(tmp, f"{name}-tuned", "finetune.json"), encoding="utf-8") as f:
                results[name] = {**json.load(f), "wall_seconds": time.perf_counter() - start}
    report(args, results)


def report(args, results: dict) -> None:
    first = results["pretrained"]
    print(f"word order{' (ends kept)' if args.keep_ends else ''}, {first['train_examples']} train / {first['held_out_examples']} held out, "
          f"{args.epochs} epochs, run {args.run}, text {args.text_file or 'embedded corpus'}")
    print(f"{'backbone':<12}{'held-out accuracy':>20}{'independent blocks':>20}{'seconds':>10}")
    print(f"{'majority':<12}{first['majority_baseline']:>20.3f}")
    for name, r in results.items():
        print(f"{name:<12}{r['held_out_accuracy']:>20.3f}{r['independent_blocks']:>20}{r['wall_seconds']:>10.0f}")
    if args.out:
        from megatie.runtime.atomic import write_json_atomic

        write_json_atomic(args.out, {"task": "word order" + (" (ends kept)" if args.keep_ends else ""), "settings": vars(args),
                                     "majority_baseline": first["majority_baseline"],
                                     **{name: {k: r[k] for k in ("held_out_accuracy", "epochs", "tie_state",
                                                                 "trainable_params", "wall_seconds")}
                                        for name, r in results.items()}})


if __name__ == "__main__":
    main()
