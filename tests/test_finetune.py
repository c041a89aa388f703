"""``megatie finetune``: classification from a run or an export, the tie map kept, an exportable result."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from megatie.data.sources import default_corpus_text
from test_export import exports, megatie, one_line_error, run  # noqa: F401 (fixtures)

FAST = ["--epochs", "2", "--batch-size", "16", "--lr", "1e-3", "--no-progress"]


def _lines(n: int, min_words: int = 5) -> list[str]:
    lines = [line.strip() for t in default_corpus_text() for line in t.splitlines() if len(line.split()) >= min_words]
    return random.Random(0).sample(lines, n)


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    """A learnable task on real text, with unequal classes (majority baseline 0.6): is the line in capitals?
    Labels 3 and 7, not 0 and 1, so that the mapping to class indices is exercised."""
    root = tmp_path_factory.mktemp("labeled")
    rows = [{"text": line.upper() if i % 5 < 2 else line, "label": 7 if i % 5 < 2 else 3}
            for i, line in enumerate(_lines(300))]
    with open(root / "train.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return root / "train.jsonl"


@pytest.fixture(scope="module")
def tuned(run, labeled, tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned") / "model"
    r = megatie("finetune", run, out, "--train-file", labeled, *FAST)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_beats_the_majority_baseline(tuned):
    summary = json.loads((tuned / "finetune.json").read_text())
    assert summary["majority_baseline"] == pytest.approx(0.6, abs=0.08)
    assert summary["held_out_examples"] == 60 and summary["train_examples"] == 240
    assert summary["held_out_accuracy"] >= summary["majority_baseline"] + 0.2, summary["epochs"]
    assert summary["classes"] == [3, 7]
    rows = [json.loads(line) for line in (tuned / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and (tuned / "tensorboard").is_dir()


def test_tie_map_is_kept_and_the_optimizer_sees_each_group_once(run, labeled):
    from megatie.config import FinetuneConfig
    from megatie.tools.finetune import build_classifier, load_backbone

    config, weights, state, _ = load_backbone(str(run))
    assert state == [0, 1, 0, 1]  # the run's alternate tie map
    model, tying = build_classifier(config, weights, state, [3, 7], pad_id=0)
    blocks = model.transformer.h
    assert blocks[2].mlp.c_fc.weight is blocks[0].mlp.c_fc.weight
    assert blocks[3].attn.c_attn.weight is blocks[1].attn.c_attn.weight
    per_block = len(list(blocks[0].parameters()))
    assert len(list(model.parameters())) == len(list(model.transformer.wte.parameters())) + 1 + 2 * per_block + 2 + 1
    before = blocks[0].mlp.c_fc.weight.detach().clone()
    from megatie.tools.finetune import _train, encode_examples
    from megatie.tools.inference import tokenizer_in
    from megatie.data.labeled import read_examples

    tokenizer = tokenizer_in(str(run / "tokenizer"))
    examples = read_examples(str(labeled))
    ids, y = encode_examples(tokenizer, examples, [3, 7], 32)
    cfg = FinetuneConfig(source=str(run), out_dir="unused", train_file=str(labeled), epochs=1, progress=False)
    _train(model, cfg, ids[:32], y[:32], ids[32:40], y[32:40], pad_id=0)
    assert not torch.equal(before, blocks[0].mlp.c_fc.weight)  # trained, and still one tensor:
    assert blocks[2].mlp.c_fc.weight is blocks[0].mlp.c_fc.weight


PLAIN_LOAD = """
import sys, torch
sys.modules["megatie"] = None  # the result must load with transformers alone
from transformers import AutoModelForSequenceClassification, AutoTokenizer
model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1]).eval()
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
texts = sys.argv[3:]
batch = tokenizer(texts, add_special_tokens=False, padding=True, truncation=True, max_length=32, return_tensors="pt")
with torch.no_grad():
    logits = model(**batch).logits
torch.save({"logits": logits, "labels": [model.config.id2label[int(i)] for i in logits.argmax(-1)]}, sys.argv[2])
"""


def test_result_loads_with_transformers_alone_and_agrees(tuned, tmp_path):
    from megatie.tools.finetune import accuracy, encode_examples
    from megatie.tools.inference import tokenizer_in
    from megatie.data.labeled import Examples
    from transformers import AutoModelForSequenceClassification

    texts = ["THE LIST DATA TYPE HAS MORE METHODS.", "Here are all of the methods of list objects."]
    r = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(tuned), str(tmp_path / "out.pt"), *texts],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    plain = torch.load(tmp_path / "out.pt", weights_only=True)
    assert plain["labels"] == ["7", "3"]
    config = json.loads((tuned / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForSequenceClassification"] and config["megatie_tie_state"] == [0, 1, 0, 1]
    model = AutoModelForSequenceClassification.from_pretrained(str(tuned)).eval()
    tokenizer = tokenizer_in(str(tuned))
    ids, y = encode_examples(tokenizer, Examples(texts, [7, 3]), [3, 7], 32)
    assert accuracy(model, ids, y, 2, config["pad_token_id"]) == 1.0


def test_finetune_from_an_export_keeps_its_ties(exports, labeled, tmp_path):
    for source in exports:  # hf (tie map in its config) and compact (tie_map.json)
        out = tmp_path / source.name
        r = megatie("finetune", source, out, "--train-file", labeled, "--epochs", "1", "--no-progress")
        assert r.returncode == 0, r.stderr[-2000:]
        assert json.loads((out / "finetune.json").read_text())["tie_state"] == [0, 1, 0, 1]


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_bad_labeled_files_are_one_line_and_write_nothing(run, tmp_path):
    out = tmp_path / "out"
    cases = [
        (_write(tmp_path / "a.csv", "text,label\nhello there,1\nsecond row,x\n"), "a.csv line 3: label 'x' is not an integer"),
        (_write(tmp_path / "b.csv", "text,label\nhello there,1\nsecond row,\n"), "b.csv line 3: label missing"),
        (_write(tmp_path / "c.jsonl", '{"text": "a b", "label": 1}\n{"text": "c d"}\n'), "c.jsonl line 2: no 'label'"),
        (_write(tmp_path / "d.jsonl", '{"text": "a b", "label": 1.5}\n'), "d.jsonl line 1: label 1.5 is not an integer"),
        (_write(tmp_path / "e.csv", "sentence,label\nhello,1\n"), "e.csv line 2: no 'text' field"),
        (_write(tmp_path / "f.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 1}\n{"text": "c", "label": 1}\n'),
         "a single label (1)"),
        (_write(tmp_path / "g.txt", "hello\n"), "must be .csv, .tsv or .jsonl"),
        (_write(tmp_path / "h.jsonl", '{"text": "a", "label": 1}\nnot json\n'), "h.jsonl line 2: not valid JSON"),
    ]
    for path, needle in cases:
        one_line_error(megatie("finetune", run, out, "--train-file", path, "--no-progress"), needle)
    one_line_error(megatie("finetune", run, out, "--train-file", tmp_path / "missing.csv"), "not found")
    one_line_error(megatie("finetune", run, out, "--train-file", cases[0][0], "--held-out", "1.5"), "--held-out")
    good = _write(tmp_path / "good.csv", "text,label\n" + "".join(f"line {i},{i % 2}\n" for i in range(10)))
    one_line_error(megatie("finetune", tmp_path, out, "--train-file", good), "neither a run directory")
    one_line_error(megatie("finetune", run, tmp_path / "a.csv", "--glue", "sst2"), "is not an empty directory")
    one_line_error(megatie("finetune", run, out, "--glue", "stsb"), "unknown GLUE task 'stsb'")
    one_line_error(megatie("finetune", run, out), "one of the arguments --train-file --glue is required")
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_held_out_split_is_seeded_and_disjoint():
    from megatie.data.labeled import Examples, split_held_out

    examples = Examples([f"t{i}" for i in range(50)], [i % 2 for i in range(50)])
    a_train, a_held = split_held_out(examples, 0.2, seed=1)
    b_train, b_held = split_held_out(examples, 0.2, seed=1)
    assert a_held.texts == b_held.texts and len(a_held) == 10 and len(a_train) == 40
    assert not set(a_train.texts) & set(a_held.texts)
    assert split_held_out(examples, 0.2, seed=2)[1].texts != a_held.texts
