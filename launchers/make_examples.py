"""Write the small example files the README's commands use, from the embedded corpus (offline):

    python launchers/make_examples.py            # examples/held_out.txt, examples/labeled.csv

- ``held_out.txt``: the last topics of Python's documentation text - the part the default run keeps out
  of training for its test split - as a raw multi-line document for ``megatie eval``.
- ``labeled.csv``: a classification task on real lines of that text, for ``megatie finetune``: is the
  line Python code (an interactive ``>>>`` line, or one opening a def, class, import...: label 1) or a
  line of prose (label 0)?
  Columns ``text,label``; labels are integers; quoting is the csv module's.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import re
import sys


def held_out_text(topics: list[str], fraction: float = 0.05) -> str:
    """The last topics, about ``fraction`` of the text, as written."""
    total, kept = sum(len(t) for t in topics), []
    for topic in reversed(topics):
        kept.insert(0, topic)
        if sum(len(t) for t in kept) >= fraction * total:
            break
    return "\n".join(kept)


# A line of Python: an interactive line, or one that opens a statement as code does.
CODE = re.compile(r"^(>>> |\.\.\. |def \w+\(|class \w+|import \w|from \S+ import |return\b|print\()")


def labeled_rows(topics: list[str], per_class: int = 200, seed: int = 0) -> list[tuple[str, int]]:
    code, prose = [], []
    for topic in topics:
        for line in topic.splitlines():
            text = line.strip()
            if len(text.split()) < 3:
                continue
            if CODE.match(text):
                code.append(text)
            elif text[0].isupper() and text.endswith(".") and not line.startswith("   "):
                prose.append(text)  # a sentence's last line, outside any indented block
    rng = random.Random(seed)
    n = min(per_class, len(code), len(prose))
    rows = [(t, 1) for t in rng.sample(code, n)] + [(t, 0) for t in rng.sample(prose, n)]
    rng.shuffle(rows)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="examples", help="where to write them (default: examples)")
    args = p.parse_args(argv)
    from megatie.data.sources import default_corpus_text

    topics = default_corpus_text()
    try:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, "held_out.txt"), "w", encoding="utf-8") as f:
            f.write(held_out_text(topics))
        with open(os.path.join(args.out_dir, "labeled.csv"), "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(labeled_rows(topics))
    except OSError as e:
        print(f"error: cannot write into {args.out_dir}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out_dir}/held_out.txt and {args.out_dir}/labeled.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
