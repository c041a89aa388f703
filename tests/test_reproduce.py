"""benchmarks/reproduce.py (commands, table) and megatie/metrics/plots.py (the paper's figures)."""

import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from megatie.metrics import plots

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", os.path.join(ROOT, "benchmarks", "reproduce.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flag(cmd, name):
    return cmd[cmd.index(name) + 1]


def test_every_row_gets_the_same_seed_steps_and_data(capsys):
    rep = load_reproduce()
    opts, rows = rep.parse(["--train-file", "t.txt", "--valid-file", "v.txt", "--rows", "all", "--seeds", "7,8",
                            "--regime", "long", "--out-dir", "out"])
    assert rows[0] == "qlearning" and set(rows) == set(rep.ROWS)
    assert set(rep.TABLE4) <= set(rep.ROWS)
    for seed in opts.seeds:
        cmds = {r: rep.command(opts, r, seed) for r in rows}
        assert {flag(c, "--seed") for c in cmds.values()} == {str(seed)}
        assert {flag(c, "--max-steps") for c in cmds.values()} == {"1500"}
        assert {flag(c, "--train-file") for c in cmds.values()} == {"t.txt"}
        assert flag(cmds["static"], "--reference-run") == os.path.join("out", "long", f"s{seed}", "qlearning")
        assert flag(cmds["all-tied"], "--static-state") == ",".join(["0"] * 12)
        assert flag(cmds["cycle-2"], "--static-state") == "0,1,0,1,0,1,0,1,0,1,0,1"
    opts, rows = rep.parse(["--rows", "vanilla,cycle"])
    assert rows == ["qlearning", "vanilla", "cycle"]  # the reference run comes first
    with pytest.raises(SystemExit):
        rep.parse(["--rows", "nonsense"])
    assert rep.main(["--dry-run", "--rows", "cycle", "--steps", "50"]) == 0
    assert "--max-steps 50" in capsys.readouterr().out


def test_paper_regime_trains_every_row_on_the_same_corpus_prefix(tmp_path):
    rep = load_reproduce()
    text = tmp_path / "train.txt"
    lines = [f"line {i} of the corpus\n" for i in range(41)]
    text.write_text("".join(lines))
    out = tmp_path / "out"
    opts, rows = rep.parse(["--train-file", str(text), "--rows", "conventional,cycle", "--regime", "paper",
                            "--out-dir", str(out), "--", "--tokenizer", "some.model"])
    opts.tokenizer_args = rep.full_corpus_tokenizer(opts)
    assert opts.tokenizer_args == []  # a tokenizer named by the user is kept
    cmds = [rep.command(opts, r, 1) for r in rows]
    files = {flag(c, "--train-file") for c in cmds}
    assert len(files) == 1 and {flag(c, "--max-steps") for c in cmds} == {"2000"}
    assert {flag(c, "--eval-every") for c in cmds} == {"100"}
    subset = files.pop()
    assert open(subset).readlines() == lines[:11]  # ceil(25% of 41) lines, a prefix
    assert rep.subset_file(str(text), 1.0, str(out)) == str(text)
    with pytest.raises(SystemExit):
        rep.parse(["--train-fraction", "0"])


def fake_summary(policy, ppl, params, indep):
    return {"best_val_ppl": ppl, "final_val_ppl": ppl + 1, "mean_trainable_params": params,
            "final_trainable_params": params, "mean_independent_layers": indep, "final_independent_layers": indep,
            "tokens_per_second": 1000.0, "tie_policy": policy}


def test_report_aggregates_seeds(tmp_path):
    rep = load_reproduce()
    opts, rows = rep.parse(["--rows", "conventional,grow", "--seeds", "1,2", "--out-dir", str(tmp_path)])
    for seed, ppl in ((1, 50.0), (2, 52.0)):
        for row, params, indep in (("conventional", 3e6, 12), ("grow", 1e6, 2)):
            d = rep.run_dir(str(tmp_path), "short", seed, row)
            os.makedirs(d)
            with open(os.path.join(d, "summary.json"), "w") as f:
                json.dump(fake_summary(row, ppl + (5 if row == "grow" else 0), params, indep), f)
    md, js = rep.write_report(opts, rows)
    text = open(md).read()
    assert "| conventional |" in text and "51.00 ± 1.41" in text and "56.00 ± 1.41" in text
    assert "| 33% |" in text and "| 100% |" in text
    data = json.load(open(js))
    assert [r["row"] for r in data["rows"]] == ["conventional", "grow"] and len(data["rows"][1]["runs"]) == 2


def make_run(tmp_path):
    """A 4-block qlearning run: frozen start, decisions at steps 5, 10, 15; 20 steps in all."""
    d = tmp_path / "run"
    (d / "checkpoints" / "best").mkdir(parents=True)
    states = [[0, 1, 1, 3], [0, 0, 2, 2], [0, 0, 2, 2]]
    (d / "config.json").write_text(json.dumps({"tie_policy": "qlearning", "tie_every": 5}))
    (d / "summary.json").write_text(json.dumps({"n_layer": 4, "steps": 20, "final_state": states[-1]}))
    rows = [{"event": "train", "step": 1}]
    for i, s in enumerate(states):
        rows.append({"event": "decision", "decision": i, "step": 5 * (i + 1), "state": s, "tied": 1,
                     "retied": 0, "untied": 1, "n_independent": len(set(s))})
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = torch.randn(16, 8, generator=g)
    tensors = {"transformer.wte.weight": torch.randn(10, 8, generator=g)}
    for block, w in ((0, base), (2, -base + 0.01 * torch.randn(16, 8, generator=g))):
        tensors[f"transformer.h.{block}.mlp.c_fc.weight"] = w
        tensors[f"transformer.h.{block}.mlp.c_proj.weight"] = w.T.contiguous()
        tensors[f"transformer.h.{block}.mlp.c_fc.bias"] = torch.zeros(8)
    save_file(tensors, str(d / "checkpoints" / "best" / "model.safetensors"))
    return d


def test_figures_from_a_run_directory(tmp_path):
    d = make_run(tmp_path)
    run = plots.load_run(str(d))
    # Steps 1-5: block 0 alone (frozen start); 6-10: blocks 0, 1, 3; 11-20: blocks 0, 2.
    assert plots.trainable_steps(run).tolist() == [20, 5, 10, 5]
    weights = plots.mlp_weights(str(d))
    assert list(weights) == [0, 2] and weights[0].size == 2 * 16 * 8
    assert np.corrcoef(weights[0], weights[2])[0, 1] < -0.9
    paths = plots.make_figures(str(d), str(tmp_path / "fig"), prefix="q_")
    assert len(paths) == 4
    for p in paths:
        assert os.path.getsize(p) > 5000
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(Exception):
        plots.load_run(str(tmp_path / "missing"))


def test_validation_curves_mark_each_rows_best(tmp_path):
    d = make_run(tmp_path)
    with open(d / "metrics.jsonl", "a") as f:
        for step, ppl in ((5, 90.0), (10, 70.0), (15, 80.0), (20, float("nan"))):
            f.write(json.dumps({"event": "eval", "step": step, "val_ppl": ppl}) + "\n")
    path = plots.plot_validation_curves({"q": str(d)}, str(tmp_path / "curves.png"))
    assert os.path.getsize(path) > 5000
    with pytest.raises(Exception):
        plots.plot_validation_curves({"q": str(make_run(tmp_path / "no-evals"))}, str(tmp_path / "none.png"))


def test_corpora_report_chooses_the_default_by_its_worst_corpus_and_keeps_one_aside(tmp_path, capsys):
    """Row A is better on average, B on its worst corpus: B is the default. A corpus kept aside (where B
    is terrible) is reported but never chosen on; a row over the budget is never chosen."""
    rep = load_reproduce()
    text = tmp_path / "text.txt"
    text.write_text("".join(f"line {i} of a small real-looking text\n" for i in range(200)))
    specs = [f"one={text}", f"two={text}", f"aside={text}"]
    opts, rows = rep.parse(["--corpora", *specs, "--kept-aside", "aside", "--rows", "conventional,alternate,cycle",
                            "--seeds", "1,2", "--out-dir", str(tmp_path / "out"), "--report-only"])
    # (corpus, row) -> PPL, with conventional at 100 everywhere; alternate = "A", cycle = "B" but over budget
    ppl = {("one", "alternate"): 100, ("two", "alternate"): 110, ("aside", "alternate"): 103,
           ("one", "cycle"): 106, ("two", "cycle"): 107, ("aside", "cycle"): 400}
    for corpus in ("one", "two", "aside"):
        for seed in (1, 2):
            for row, params in (("conventional", 3e6), ("alternate", 0.9e6), ("cycle", 0.9e6)):
                d = rep.run_dir(str(tmp_path / "out" / corpus), "short", seed, row)
                os.makedirs(d)
                summary = fake_summary(row, ppl.get((corpus, row), 100), params, 2)
                summary.update(conventional_trainable_params=3e6, final_state=[0, 1])
                with open(os.path.join(d, "summary.json"), "w") as f:
                    json.dump(summary, f)
    assert rep.main(["--corpora", *specs, "--kept-aside", "aside", "--rows", "conventional,alternate,cycle",
                     "--seeds", "1,2", "--out-dir", str(tmp_path / "out"), "--report-only"]) == 0
    data = json.load(open(tmp_path / "out" / "corpora_short.json"))
    assert data["default"] == "cycle" and data["worst_ratio"] == pytest.approx({"alternate": 1.10, "cycle": 1.07})
    assert data["tables"]["aside"]["cycle"]["ppl_ratio"] == pytest.approx(4.0) and data["corpora"]["aside"]["kept_aside"]
    assert os.path.getsize(tmp_path / "out" / "pareto_short.png") > 1000
    assert (tmp_path / "out" / "corpora" / "one" / "valid.txt").read_text().startswith("line 180")
    # over the budget: cycle at 0.5x no longer qualifies, and alternate becomes the default
    for corpus in ("one", "two"):
        for seed in (1, 2):
            path = os.path.join(rep.run_dir(str(tmp_path / "out" / corpus), "short", seed, "cycle"), "summary.json")
            summary = json.load(open(path))
            summary["mean_trainable_params"] = 1.5e6
            json.dump(summary, open(path, "w"))
    rep.main(["--corpora", *specs, "--kept-aside", "aside", "--rows", "conventional,alternate,cycle", "--seeds", "1,2",
              "--out-dir", str(tmp_path / "out"), "--report-only"])
    assert json.load(open(tmp_path / "out" / "corpora_short.json"))["default"] == "alternate"


def test_bad_corpus_specs_end_in_one_line(tmp_path):
    corpora = importlib.util.spec_from_file_location("corpora", os.path.join(ROOT, "benchmarks", "corpora.py"))
    module = importlib.util.module_from_spec(corpora)
    corpora.loader.exec_module(module)
    for spec, message in (("nosuch", "unknown corpus"), (f"x={tmp_path}/missing.txt", "no such file"),
                          ("bad name=x", "corpus name")):
        with pytest.raises(SystemExit, match=message):
            module.prepare(spec, str(tmp_path))
    short = tmp_path / "short.txt"
    short.write_text("only\nfive\nlines\nof\ntext\n")
    with pytest.raises(SystemExit, match="at least 20 non-empty lines"):
        module.prepare(f"s={short}", str(tmp_path))


def test_deep_regime_uses_its_preset_and_compares_smaller_shapes_with_conventional(tmp_path):
    """The deep regime trains the `deep` preset (6 blocks: the tie maps have six entries); a row that
    trains another shape (two narrower blocks) is compared with the conventional row's parameters, not
    its own untied count (which would call it 1.00x)."""
    rep = load_reproduce()
    opts, rows = rep.parse(["--train-file", "t.txt", "--valid-file", "v.txt", "--regime", "deep",
                            "--rows", "conventional,all-tied-lora4,untied-2x56", "--out-dir", "out"])
    cmds = {r: rep.command(opts, r, 1) for r in rows}
    assert {flag(c, "--preset") for c in cmds.values()} == {"deep"}
    assert {flag(c, "--max-steps") for c in cmds.values()} == {"1800"}
    assert flag(cmds["all-tied-lora4"], "--static-state") == "0,0,0,0,0,0"
    assert flag(cmds["untied-2x56"], "--n-layer") == "2" and flag(cmds["untied-2x56"], "--n-embd") == "56"
    text = tmp_path / "text.txt"
    text.write_text("".join(f"line {i} of a small real-looking text\n" for i in range(200)))
    args = ["--corpora", f"one={text}", "--regime", "deep", "--rows", "conventional,untied-2x56", "--seeds", "1",
            "--out-dir", str(tmp_path / "out"), "--report-only"]
    for row, params, ppl in (("conventional", 341e3, 14.0), ("untied-2x56", 113e3, 15.4)):
        d = rep.run_dir(str(tmp_path / "out" / "one"), "deep", 1, row)
        os.makedirs(d)
        summary = fake_summary(row, ppl, params, 2)
        summary.update(conventional_trainable_params=params, final_state=[0, 1])
        with open(os.path.join(d, "summary.json"), "w") as f:
            json.dump(summary, f)
    assert rep.main(args) == 0
    cell = json.load(open(tmp_path / "out" / "corpora_deep.json"))["tables"]["one"]["untied-2x56"]
    assert cell["param_ratio"] == pytest.approx(113 / 341) and cell["ppl_ratio"] == pytest.approx(1.1)
    assert json.load(open(tmp_path / "out" / "corpora_deep.json"))["default"] is None  # a plain model is no policy
