"""BERT (masked LM) and ViT (images) through megatie: tied blocks compute with one tensor and match an
untied model holding the same weights; an untie carries weights and optimizer state; training resumes
exactly across regroups (masks and augmentation included); the launchers train, export to models that
transformers loads on its own, and refuse bad input in one line; 2 ranks under ZeRO-2 agree."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatie.tools.train_cli import build_parser, config_from_args
from megatie.tools.export import untied_state_dict
from megatie.models.objectives import model_inputs_on
from megatie.trainer import Trainer
from megatie.tying.layers import unique_parameters
from test_zero_distributed import _port

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = {f: ROOT / "launchers" / f"train_{f}.py" for f in ("bert", "vit", "gpt2")}
COMMON = ["--n-layer", "6", "--n-embd", "32", "--n-head", "4", "--lr", "2e-3", "--tie-every", "4",
          "--tie-policy", "qlearning", "--log-every", "1", "--eval-every", "100000", "--eval-batches", "2",
          "--no-progress", "--seed", "3"]
SHAPE = {"bert": COMMON + ["--seq-len", "32", "--batch-size", "4", "--vocab-size", "512"],
         "vit": COMMON + ["--batch-size", "8"]}


def _trainer(family, out, cache, *extra) -> Trainer:
    cfg = config_from_args(build_parser().parse_args(["--out-dir", str(out), "--cache-dir", str(cache),
                                                      *SHAPE[family], *extra]))
    cfg = cfg.replace(model=family)
    return Trainer(cfg)


def _losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, open(Path(out) / "metrics.jsonl"))
            if r.get("event") == "train"}


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_tied_blocks_share_tensors_and_compute_as_an_untied_copy(tmp_path, family):
    t = _trainer(family, tmp_path / "run", tmp_path / "c", "--max-steps", "5")
    t.tying.apply([0, 1, 0, 1, 4, 4])
    blocks = t.tying.blocks
    assert all(a is b for a, b in zip(blocks[2].parameters(), blocks[0].parameters()))
    assert all(a is b for a, b in zip(blocks[5].parameters(), blocks[4].parameters()))
    with torch.no_grad():
        for p in t.model.parameters():  # distinguishable weights everywhere
            p.add_(torch.randn_like(p) * 0.05)
    plain = type(t.model)(t.model.config)  # every block with tensors of its own, holding the same weights
    plain.load_state_dict(untied_state_dict(t.model, t.tying))
    assert len(list(plain.parameters())) > len(list(t.model.parameters()))
    inputs = t.objective.eval_inputs(next(iter(t.data.eval_batches("valid", 2, 1))), 0)
    inputs.pop("labels")
    t.model.eval(), plain.eval()
    with torch.no_grad():  # each model where it lives (the trainer's may be on a GPU)
        tied = t.model(**model_inputs_on(inputs, t.model, t.device)).logits.cpu()
        assert torch.allclose(tied, plain(**inputs).logits, atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_an_untie_carries_weights_and_optimizer_state(tmp_path, family):
    t = _trainer(family, tmp_path / "run", tmp_path / "c", "--max-steps", "1", "--tie-policy", "conventional")
    t.tying.apply([0, 0, 2, 2, 4, 4])
    t.engine.regroup(t.tying.apply([0, 0, 2, 2, 4, 4]))
    t.engine.train_step([t.next_inputs()])  # every trainable tensor has Adam state
    source = [p for p in t.tying.root_parameters(0)]
    weights = [p.detach().clone() for p in source]
    moments = [{k: v.clone() for k, v in t.engine.optimizer.state[p].items()} for p in source]
    t.engine.regroup(t.tying.apply([0, 1, 2, 2, 4, 4]))  # block 1 unties from block 0
    untied = t.tying.root_parameters(1)
    assert all(a is not b for a, b in zip(untied, source))
    for p, w, m in zip(untied, weights, moments):
        assert torch.equal(p, w)
        assert set(t.engine.optimizer.state[p]) == set(m)
        assert all(torch.equal(t.engine.optimizer.state[p][k], v) for k, v in m.items())
    trainable = {id(p) for p in unique_parameters(t.model, trainable_only=True)}
    assert {id(p) for g in t.engine.optimizer.param_groups for p in g["params"]} == trainable


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_resume_across_regroups_is_exact(tmp_path, family):
    full = _trainer(family, tmp_path / "full", tmp_path / "c", "--max-steps", "12", "--checkpoint-every", "6")
    full.train()
    assert full.stats["regroups"] >= 1
    part = _trainer(family, tmp_path / "part", tmp_path / "c", "--max-steps", "12", "--resume",
                    str(tmp_path / "full" / "checkpoints" / "step_00000006"))
    part.train()
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "part")
    assert sorted(b) == list(range(7, 13)) and all(a[s] == b[s] for s in b)


def test_masks_and_augmentation_depend_on_the_step_not_on_history(tmp_path):
    bert = _trainer("bert", tmp_path / "b", tmp_path / "c", "--max-steps", "5")
    raw = next(bert.loader)
    a, b = bert.objective.train_inputs(raw, 5, 0, 0), bert.objective.train_inputs(raw, 5, 0, 0)
    c = bert.objective.train_inputs(raw, 6, 0, 0)
    assert torch.equal(a["input_ids"], b["input_ids"]) and not torch.equal(a["input_ids"], c["input_ids"])
    chosen = (a["labels"] != -100).float().mean().item()
    assert 0.05 < chosen < 0.3  # about --mask-prob 0.15 of the tokens
    folder = _image_folder(tmp_path / "images")  # natural-image sources are augmented (digits are not)
    vit = _trainer("vit", tmp_path / "v", tmp_path / "c", "--max-steps", "5", "--image-dir", str(folder))
    raw = next(vit.loader)
    x, y = vit.objective.train_inputs(raw, 5, 0, 0), vit.objective.train_inputs(raw, 6, 0, 0)
    assert torch.equal(x["labels"], raw[1]) and not torch.equal(x["pixel_values"], y["pixel_values"])
    assert torch.equal(x["pixel_values"], vit.objective.train_inputs(raw, 5, 0, 0)["pixel_values"])
    digits = _trainer("vit", tmp_path / "d", tmp_path / "c", "--max-steps", "5")
    raw = next(digits.loader)
    assert torch.equal(digits.objective.train_inputs(raw, 5, 0, 0)["pixel_values"],
                       digits.objective.eval_inputs(raw, 0)["pixel_values"])


def _cli(script, *args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MEGATIE_DEBUG")}
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def _export(run, out):
    r = subprocess.run([sys.executable, "-m", "megatie", "export", str(run), str(out)], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]


def _without_megatie(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", "import sys; sys.modules['megatie'] = None\n" + code],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_bert_launcher_trains_exports_a_fill_mask_model_and_refuses_gpt2_resume(tmp_path):
    run, cache = tmp_path / "run", tmp_path / "c"
    r = _cli(LAUNCHER["bert"], "--out-dir", run, "--cache-dir", cache, *SHAPE["bert"], "--max-steps", "8",
             "--checkpoint-every", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["objective"] == "masked" and 0 <= summary["final_val_accuracy"] <= 1
    _export(run, tmp_path / "hf")
    probe = (f"from transformers import pipeline\nfill = pipeline('fill-mask', model={str(tmp_path / 'hf')!r})\n"
             "print(fill.tokenizer.mask_token, type(fill.model).__name__, len(fill('the [MASK] of it')))")
    assert _without_megatie(probe) == "[MASK] BertForMaskedLM 5"
    r = _cli(LAUNCHER["gpt2"], "--out-dir", run, "--cache-dir", cache, "--resume", "auto", "--no-progress")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "checkpoint was made with model='bert', this run has 'gpt2'" in r.stderr
    r = subprocess.run([sys.executable, "-m", "megatie", "eval", str(run), "--file", str(ROOT / "README.md")],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "fill-mask" in r.stderr, r.stderr


def _image_folder(root: Path, classes=("horizontal", "vertical"), per_class=12, side=16) -> Path:
    """Stripes across or down, with noise: two classes a small ViT tells apart."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            stripes = np.tile((np.arange(side) // 2 % 2 * 200)[:, None], (1, side))
            img = (stripes if c == 0 else stripes.T) + rng.integers(0, 55, (side, side))
            Image.fromarray(img.astype(np.uint8)).convert("RGB").save(root / name / f"{i}.png")
    return root


def test_vit_launcher_trains_on_an_image_folder_and_exports_a_classifier(tmp_path):
    folder = _image_folder(tmp_path / "images")
    run = tmp_path / "run"
    r = _cli(LAUNCHER["vit"], "--out-dir", run, "--image-dir", folder, *SHAPE["vit"], "--max-steps", "8",
             "--checkpoint-every", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    # An image classifier's result is its accuracy, not a perplexity; the run says where its files are.
    assert "final_val_accuracy=" in r.stdout and "ppl" not in r.stdout and f"results in {run}:" in r.stdout
    config = json.loads((run / "config.json").read_text())
    assert (config["image_size"], config["patch_size"], config["num_classes"], config["seq_len"]) == (32, 8, 2, 17)
    _export(run, tmp_path / "hf")
    probe = ("from PIL import Image\nfrom transformers import pipeline\n"
             f"clf = pipeline('image-classification', model={str(tmp_path / 'hf')!r})\n"
             f"print(sorted(r['label'] for r in clf(Image.open({str(folder / 'vertical' / '0.png')!r}))))")
    assert _without_megatie(probe) == "['horizontal', 'vertical']"
    from megatie.tools.export import load_run

    ours = load_run(str(run))[0]
    probe = ("import json, torch\nfrom PIL import Image\n"
             "from transformers import AutoImageProcessor, AutoModelForImageClassification\n"
             f"p = AutoImageProcessor.from_pretrained({str(tmp_path / 'hf')!r})\n"
             f"m = AutoModelForImageClassification.from_pretrained({str(tmp_path / 'hf')!r})\n"
             f"x = p(Image.open({str(folder / 'vertical' / '0.png')!r}), return_tensors='pt')['pixel_values']\n"
             "print(json.dumps({'x': x.tolist(), 'logits': m(pixel_values=x).logits[0].tolist()}))")
    out = json.loads(_without_megatie(probe))
    x = torch.tensor(out["x"])
    assert torch.allclose(ours(pixel_values=x).logits[0], torch.tensor(out["logits"]), atol=1e-5)
    # The exported processor makes exactly the pixels training made of the same file.
    from megatie.config import TrainConfig
    from megatie.data.images import _read_image
    from megatie.models.objectives import ImageClassification

    objective = ImageClassification(TrainConfig.from_flat(model="vit", image_dir=str(folder)).resolved())
    objective.build_data(0, 1, None)
    image = _read_image(folder / "vertical" / "0.png", 32)[None]
    trained_on = objective.eval_inputs((image, torch.tensor([1])), 0)["pixel_values"]
    assert torch.allclose(trained_on, x, atol=1e-5)


@pytest.mark.parametrize("case, expected", [
    ("empty", "no images"), ("one-class", "one class only"), ("bad-image", "cannot read image"),
    ("mask-prob", "--mask-prob must be in (0, 1)"), ("text-for-vit", "train_vit.py reads images"),
])
def test_bad_input_is_one_line(tmp_path, case, expected):
    script, args = LAUNCHER["vit"], ["--out-dir", tmp_path / "run", "--max-steps", "2", "--no-progress"]
    if case == "empty":
        (tmp_path / "images" / "cats").mkdir(parents=True)
        args += ["--image-dir", tmp_path / "images"]
    elif case == "one-class":
        _image_folder(tmp_path / "images", classes=("only",))
        args += ["--image-dir", tmp_path / "images"]
    elif case == "bad-image":
        _image_folder(tmp_path / "images")
        (tmp_path / "images" / "vertical" / "broken.png").write_bytes(b"not a png")
        args += ["--image-dir", tmp_path / "images"]
    elif case == "mask-prob":
        script, args = LAUNCHER["bert"], args + ["--mask-prob", "1.5"]
    else:
        args += ["--train-file", ROOT / "README.md"]
    r = _cli(script, *args)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and expected in r.stderr, r.stderr


@pytest.mark.slow  # about a minute each: the deepspeed launcher, two CPU ranks, regroups under ZeRO-2
@pytest.mark.parametrize("family", ["bert", "vit"])
def test_two_ranks_zero2_train_with_regroups_and_agree(tmp_path, family):
    if shutil.which("deepspeed") is None:
        pytest.skip("the deepspeed launcher is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MEGATIE_DEBUG")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    r = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(_port()), str(LAUNCHER[family]),
                        "--deepspeed", str(ROOT / "ds_configs" / "zero2.json"), "--out-dir", str(tmp_path / "run"),
                        "--cache-dir", str(tmp_path / "c"), *SHAPE[family], "--max-steps", "12", "--no-checkpoints"],
                       capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["regroups"] >= 1 and summary["engine"] == "deepspeed"
    assert len(set(summary["rank_param_checksums"])) == 1 and summary["final_val_accuracy"] is not None
