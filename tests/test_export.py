"""Taking a model out of a run: Hugging Face and compact exports, evaluation and sampling, through the
``megatie`` command as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatie.tools.train_cli import run_main, train_main
from megatie.data.sources import default_corpus_text
from megatie.tools.export import load_compact, load_run

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--n-layer", "4", "--n-embd", "32", "--n-head", "2", "--seq-len", "32", "--batch-size", "4",
        "--vocab-size", "512", "--max-steps", "12", "--checkpoint-every", "6", "--eval-every", "6", "--seed", "3",
        "--no-progress", "--tie-policy", "alternate"]  # a known tie map: 0,1,0,1


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def megatie(*args):
    """The ``megatie`` command, in this process (its imports are paid once for the whole file)."""
    import contextlib
    import io

    from megatie.tools.command import command_main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = run_main(command_main, [str(a) for a in args])
        except SystemExit as e:  # argparse's own exit, as the process would end
            code = e.code
    return Result(code, out.getvalue(), err.getvalue())


def test_the_command_as_installed(tmp_path):
    r = subprocess.run([sys.executable, "-m", "megatie", "export", str(tmp_path), str(tmp_path / "x")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    one_line_error(r, "is not a run directory")
    r = subprocess.run([sys.executable, "-m", "megatie", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "export" in r.stdout and "generate" in r.stdout


def one_line_error(r, needle):
    lines = [line for line in r.stderr.splitlines() if line.strip() and "Warning" not in line]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    out = root / "run"
    assert run_main(train_main, ARGS + ["--out-dir", str(out), "--cache-dir", str(root / "cache")]) == 0
    return out


@pytest.fixture(scope="module")
def exports(run, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    for fmt in ("hf", "compact"):
        r = megatie("export", run, root / fmt, "--format", fmt)
        assert r.returncode == 0, r.stderr[-2000:]
    return root / "hf", root / "compact"


@pytest.fixture(scope="module")
def held_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("held") / "held.txt"
    lines = [line for t in default_corpus_text() for line in t.splitlines() if line.strip()]
    path.write_text("\n".join(lines[-400:]) + "\n", encoding="utf-8")
    return path


PLAIN_LOAD = """
import sys, torch
sys.modules["megatie"] = None  # the export must load with transformers alone
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
ids = torch.tensor([tokenizer(sys.argv[3], add_special_tokens=False)["input_ids"][:32]])
with torch.no_grad():
    torch.save({"ids": ids, "logits": model(input_ids=ids).logits}, sys.argv[2])
"""


def test_hf_export_loads_without_megatie_and_gives_its_logits(run, exports, tmp_path):
    hf, _ = exports
    text = "The list data type has some more methods. Here are all of the methods of list objects."
    r = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(hf), str(tmp_path / "out.pt"), text],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    plain = torch.load(tmp_path / "out.pt", weights_only=True)
    model, tying, _ = load_run(str(run))
    with torch.no_grad():
        ours = model(input_ids=plain["ids"]).logits
    assert plain["ids"].shape[1] > 10
    assert (ours - plain["logits"]).abs().max().item() <= 1e-5
    config = json.loads((hf / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["n_layer"] == 4 and config["eos_token_id"] == 2
    card = (hf / "README.md").read_text()
    assert str(list(tying.state)) in card and "alternate" in card


def test_compact_export_reties_blocks_and_is_smaller(run, exports):
    hf, compact = exports
    model = load_compact(str(compact))
    blocks = model.transformer.h
    assert blocks[2].mlp.c_fc.weight is blocks[0].mlp.c_fc.weight  # shared, not copied (alternate: 0,1,0,1)
    assert blocks[3].attn.c_attn.weight is blocks[1].attn.c_attn.weight
    assert blocks[1].attn.c_attn.weight is not blocks[0].attn.c_attn.weight
    ours = load_run(str(run))[0]
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ours(input_ids=ids).logits)
    assert (compact / "model.safetensors").stat().st_size < 0.8 * (hf / "model.safetensors").stat().st_size


def test_eval_agrees_on_the_run_and_its_exports(run, exports, held_text, tmp_path):
    results = []
    for source in (run, *exports):
        r = megatie("eval", source, "--file", held_text, "--json", tmp_path / "r.json")
        assert r.returncode == 0, r.stderr[-2000:]
        results.append(json.loads((tmp_path / "r.json").read_text()))
    assert results[0]["tokens"] > 1000 and 1 < results[0]["ppl"] < 512
    for other in results[1:]:
        assert other["tokens"] == results[0]["tokens"] and round(other["ppl"], 4) == round(results[0]["ppl"], 4)


def test_fast_tokenizer_matches_sentencepiece(exports):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    hf, _ = exports
    sp = spm.SentencePieceProcessor(model_file=str(hf / "tokenizer.model"))
    fast = AutoTokenizer.from_pretrained(str(hf))
    lines = [line for t in default_corpus_text() for line in t.splitlines() if line.strip()][:3000]
    lines += ["naïve café ☃ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "tabs\tand  double  spaces", "ＦＵＬＬＷＩＤＴＨ"]
    differ = [line for line in lines if fast(line, add_special_tokens=False)["input_ids"] != sp.encode(line)]
    # Only exact ties between segmentations may differ (long runs of one punctuation character).
    assert len(differ) <= len(lines) // 100, differ[:5]
    assert all(not any(c.isalnum() for c in line) for line in differ), differ[:5]
    for line in lines[-3:]:
        assert fast.decode(fast(line, add_special_tokens=False)["input_ids"]) == sp.decode(sp.encode(line))


def test_generate_is_seeded_and_refuses_an_overlong_prompt(run, exports):
    texts = [megatie("generate", source, "--prompt", "The list", "--max-new-tokens", "8", "--seed", "5").stdout
             for source in (run, exports[0], run)]
    assert texts[0] == texts[1] == texts[2] and texts[0].strip()
    one_line_error(megatie("generate", run, "--prompt", "word " * 40), "more than the model's context of 32 tokens")


def test_bad_input_is_one_line_and_writes_nothing(run, exports, tmp_path):
    one_line_error(megatie("export", run, exports[0]), "exists and is not an empty directory")
    one_line_error(megatie("export", run, tmp_path / "x", "--checkpoint", "step_99"), "has no checkpoint 'step_99'")
    one_line_error(megatie("export", tmp_path, tmp_path / "y"), "is not a run directory")
    one_line_error(megatie("export", run, tmp_path / "z", "--format", "onnx"), "invalid choice: 'onnx'")
    one_line_error(megatie("eval", run, "--file", tmp_path / "missing.txt"), "file not found")
    (tmp_path / "empty.txt").write_text("")
    one_line_error(megatie("eval", run, "--file", tmp_path / "empty.txt"), "empty.txt")
    assert sorted(os.listdir(tmp_path)) == ["empty.txt"]  # no half-written export


def test_a_run_without_checkpoints_says_so(tmp_path):
    out = tmp_path / "run"
    assert run_main(train_main, ARGS + ["--max-steps", "2", "--no-checkpoints", "--out-dir", str(out),
                                        "--cache-dir", str(tmp_path / "cache")]) == 0
    one_line_error(megatie("export", out, tmp_path / "x", "--checkpoint", "final"), "no step checkpoint")
