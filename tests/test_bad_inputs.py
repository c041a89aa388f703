"""Every mistake a user can make with the training launcher, run as the user runs it: a separate
process, the real command line. Each case must end with a non-zero exit, exactly one line on
stderr (``error: ...``, naming what to change), no traceback, and every file that existed before
byte-identical afterwards. Most cases are refused before torch loads (well under a second); those
that need a checkpoint or prepared data read them first."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatie.tools.train_cli import run_main, train_main
from megatie.data import make_corpus, prepare
from megatie.data.sources import default_corpus_text

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "launchers" / "train_gpt2.py"
SHAPE = ["--n-layer", "4", "--n-embd", "32", "--n-head", "2", "--seq-len", "32", "--batch-size", "4",
         "--vocab-size", "512", "--tie-every", "4", "--eval-every", "4", "--eval-batches", "2",
         "--checkpoint-every", "4", "--keep-checkpoints", "5", "--seed", "7", "--no-progress"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache):
    """An 8-step run with checkpoints at steps 4 and 8, made through the command line."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert run_main(train_main, SHAPE + ["--max-steps", "8", "--out-dir", str(out), "--cache-dir", cache]) == 0
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prepared")
    text = tmp / "corpus.txt"
    lines = [line.strip() for t in default_corpus_text() for line in t.splitlines() if line.strip()]
    text.write_text("\n".join(lines[:3000]) + "\n", encoding="utf-8")
    return prepare(make_corpus([str(text)]), tmp / "D", vocab_size=512, cache_dir=tmp, num_workers=0)


class Place:
    """A case's own directory and the inputs it damages (copies: fixtures stay pristine)."""

    def __init__(self, root: Path, finished: Path, prepared: Path):
        self.root, self._finished, self._prepared = root, finished, prepared

    def file(self, name: str, content: str | bytes = "") -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)

    def run(self) -> Path:
        target = self.root / "run"
        if not target.exists():
            shutil.copytree(self._finished, target)
        return target

    def ckpt(self, step: int = 8) -> Path:
        return self.run() / "checkpoints" / f"step_{step:08d}"

    def data(self) -> Path:
        target = self.root / "D"
        if not target.exists():
            shutil.copytree(self._prepared, target)
        return target


def _reseal(ckpt: Path, fname: str) -> None:
    from megatie.checkpoint.store import file_record

    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"][fname] = file_record(str(ckpt / fname))
    (ckpt / "meta.json").write_text(json.dumps(meta))


def _overwrite(path: Path, data: bytes, at: int | None = None) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2 if at is None else at)
        f.write(data)


def _plant_pickle(p: Place, fname: str) -> list[str]:
    ckpt = p.ckpt()
    marker = p.root / "payload-ran"
    (ckpt / fname).write_bytes(_pickle_payload(str(marker)))
    _reseal(ckpt, fname)
    return ["--out-dir", str(p.run()), "--resume", "auto", "--max-steps", "12", "--allow-changed", "max_steps"]


def _pickle_payload(marker: str) -> bytes:
    import io

    import torch

    from test_checkpoint_safety import Payload

    buffer = io.BytesIO()
    torch.save({"step": Payload(marker)}, buffer)
    return buffer.getvalue()


def _ds_config(p: Place, content) -> list[str]:
    return ["--deepspeed", p.file("ds.json", content if isinstance(content, str) else json.dumps(content))]


def _lock_held_by_live_process(p: Place) -> list[str]:
    import socket

    out = p.root / "busy"
    p.file("busy/.megatie.lock", json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "start": None,
                                             "since": "earlier"}))
    return ["--out-dir", str(out)]


def _foreign_state(p: Place, fname: str) -> list[str]:
    """A file that passes the hash (resealed) and the safe loader, holding something megatie never wrote."""
    import torch

    torch.save([1, 2, 3], p.ckpt() / fname)
    _reseal(p.ckpt(), fname)
    return ["--out-dir", str(p.run()), "--resume", "auto", "--max-steps", "12", "--allow-changed", "max_steps"]


def _resume(p: Place, *extra: str, step: int = 8) -> list[str]:
    return ["--out-dir", str(p.run()), "--resume", str(p.ckpt(step)), *extra]


def _damaged_shard(p: Place) -> list[str]:
    _overwrite(p.data() / "train-00000.bin", b"\xff" * 64, at=0)
    return ["--data-dir", str(p.data())]


def _meta_without(p: Place, key: str) -> list[str]:
    meta = json.loads((p.data() / "meta.json").read_text())
    meta.pop(key)
    (p.data() / "meta.json").write_text(json.dumps(meta))
    return ["--data-dir", str(p.data())]


def _changed_ckpt_bytes(p: Place, fname: str) -> list[str]:
    _overwrite(p.ckpt() / fname, b"\x7f" * 4096 if fname.endswith(".safetensors") else b"\x00" * 64)
    return _resume(p, "--max-steps", "12", "--allow-changed", "max_steps")


# (id, needle in the error line, arguments (or a function of the case's Place making them))
CHEAP = [
    ("max-steps-zero", "--max-steps must be a positive integer", ["--max-steps", "0"]),
    ("max-steps-negative", "--max-steps must be a positive integer", ["--max-steps", "-5"]),
    ("max-steps-text", "--max-steps", ["--max-steps", "ten"]),
    ("n-layer-zero", "--n-layer", ["--n-layer", "0"]),
    ("seq-len-zero", "--seq-len", ["--seq-len", "0"]),
    ("batch-size-zero", "--batch-size", ["--batch-size", "0"]),
    ("grad-accum-zero", "--grad-accum", ["--grad-accum", "0"]),
    ("tie-every-zero", "--tie-every", ["--tie-every", "0"]),
    ("log-every-zero", "--log-every", ["--log-every", "0"]),
    ("eval-every-zero", "--eval-every", ["--eval-every", "0"]),
    ("keep-checkpoints-zero", "--keep-checkpoints", ["--keep-checkpoints", "0"]),
    ("heads-do-not-divide", "divisible", ["--n-embd", "30", "--n-head", "4"]),
    ("vocab-too-small", "--vocab-size must be at least 16", ["--vocab-size", "8"]),
    ("lr-zero", "--lr must be positive", ["--lr", "0"]),
    ("lr-negative", "--lr must be positive", ["--lr=-1e-3"]),
    ("lr-text", "--lr", ["--lr", "fast"]),
    ("dropout-one", "--dropout", ["--dropout", "1.0"]),
    ("adam-beta1-one", "Adam settings", ["--adam-beta1", "1.0"]),
    ("adam-eps-zero", "Adam settings", ["--adam-eps", "0"]),
    ("peak-tflops-negative", "--peak-tflops", ["--peak-tflops", "-1"]),
    ("dist-timeout-zero", "--dist-timeout-s", ["--dist-timeout-s", "0"]),
    ("unknown-preset", "gigantic", ["--preset", "gigantic"]),
    ("unknown-policy", "telepathy", ["--tie-policy", "telepathy"]),
    ("unknown-tie-mode", "glue", ["--tie-mode", "glue"]),
    ("unknown-reward", "luck", ["--reward", "luck"]),
    ("unknown-reward-norm", "--reward-norm", ["--reward-norm", "magic"]),
    ("unknown-agent-moves", "--agent-moves", ["--agent-moves", "jump"]),
    ("unknown-lr-schedule", "--lr-schedule", ["--lr-schedule", "zigzag"]),
    ("unknown-grow-layout", "--grow-layout", ["--grow-layout", "spiral"]),
    ("grow-start-out-of-range", "--grow-start", ["--grow-start", "1.5"]),
    ("grow-final-out-of-range", "--grow-final", ["--grow-final", "99"]),
    ("static-state-not-integers", "--static-state", ["--static-state", "0,x"]),
    ("negative-switch-cost", "non-negative", ["--switch-cost", "-1"]),
    ("one-block-tying", "at least 2 blocks", ["--n-layer", "1", "--tie-policy", "qlearning"]),
    ("unknown-flag", "unrecognized arguments", ["--learning-rate", "1e-3"]),
    ("train-file-and-dataset", "either --train-file or --dataset", ["--train-file", "a.txt", "--dataset", "lm1b"]),
    ("valid-without-train", "--valid-file needs --train-file", ["--valid-file", "v.txt"]),
    ("missing-train-file", "file not found", ["--train-file", "/nonexistent/corpus.txt"]),
    ("glob-matches-nothing", "no file matches", ["--train-file", "/nonexistent/*.txt"]),
    ("train-file-is-directory", "is a directory", lambda p: ["--train-file", str(p.root)]),
    ("missing-data-dir", "--data-dir", ["--data-dir", "/nonexistent/data"]),
    ("missing-reference-run", "--reference-run", ["--tie-policy", "replay", "--reference-run", "/nonexistent/run"]),
    ("missing-resume-dir", "no such checkpoint directory", ["--resume", "/nonexistent/ckpt"]),
    ("out-dir-is-a-file", "exists and is not a directory", lambda p: ["--out-dir", p.file("taken.txt", "keep me")]),
    ("out-dir-under-a-file", "cannot create --out-dir", lambda p: ["--out-dir", p.file("plain", "x") + "/sub"]),
    ("out-dir-in-use", "in use by a running training run", _lock_held_by_live_process),
    ("out-dir-holds-a-finished-run", "already holds a finished run; continue it with --resume auto",
     lambda p: ["--out-dir", str(p.run())]),
    ("out-dir-holds-checkpoints", "already holds a run with 2 checkpoint(s)",
     lambda p: (os.remove(p.run() / "summary.json"), ["--out-dir", str(p.run())])[1]),
    ("missing-ds-config", "ds-missing.json", ["--deepspeed", "/nonexistent/ds-missing.json"]),
    ("ds-config-not-json", "JSON", lambda p: _ds_config(p, "{stage: 2")),
    ("ds-config-a-list", "ds.json", lambda p: _ds_config(p, [1, 2])),
    ("ds-config-sets-batch", "--batch-size", lambda p: _ds_config(p, {"train_batch_size": 8})),
    ("ds-config-sets-optimizer", "--lr", lambda p: _ds_config(p, {"optimizer": {"type": "Adam"}})),
    ("ds-config-stage-4", "stage", lambda p: _ds_config(p, {"zero_optimization": {"stage": 4}})),
    ("ds-config-stage-3-frozen-replica", "ZeRO stage 3: a frozen replica",
     lambda p: _ds_config(p, {"zero_optimization": {"stage": 3}}) + ["--tie-mode", "frozen-replica", "--tie-policy", "alternate"]),
    ("ds-config-both-precisions", "both", lambda p: _ds_config(p, {"bf16": {"enabled": True},
                                                                    "fp16": {"enabled": True}})),
    # Accepted before, and then did something else than asked, or a traceback.
    ("seed-negative", "--seed must be in", ["--seed=-1"]),
    ("seed-beyond-any-generator", "--seed must be in", ["--seed", str(2**70)]),
    ("pad-vocab-huge", "--pad-vocab-to must be in", ["--pad-vocab-to", "1000000000"]),
    ("vocab-huge", "--vocab-size must be at most", ["--vocab-size", "100000000"]),
    ("eval-batches-zero", "--eval-batches must be at least 1", ["--eval-batches", "0"]),
    ("threads-zero", "--threads must be in [1, 4096]", ["--threads", "0"]),
    ("warmup-negative", "--warmup-steps must be at least 0", ["--warmup-steps=-5"]),
    ("grad-clip-nan", "--grad-clip must be a finite number", ["--grad-clip", "nan"]),
    ("grad-clip-negative", "--grad-clip must be at least 0", ["--grad-clip=-1"]),
    ("lr-inf", "--lr must be a finite number", ["--lr", "inf"]),
    ("weight-decay-nan", "--weight-decay must be a finite number", ["--weight-decay", "nan"]),
    ("gamma-above-one", "--gamma must be in", ["--gamma", "1.5"]),
    ("eps-decay-nan", "--eps-decay must be a finite number", ["--eps-decay", "nan"]),
    ("tie-every-beyond-the-run", "would never decide", ["--tie-every", "50", "--max-steps", "20"]),
    ("allow-changed-without-resume", "needs --resume", ["--allow-changed", "lr"]),
    ("allow-changed-naming-nothing", "name at least one setting", ["--allow-changed", ","]),
    ("cache-dir-a-file", "--cache-dir", lambda p: ["--cache-dir", p.file("cache-file", "x")]),
    ("train-file-a-fifo", "not a regular file", lambda p: (os.mkfifo(p.root / "fifo"), ["--train-file",
                                                                                         str(p.root / "fifo")])[1]),
    ("ds-enabled-a-string", "JSON booleans", lambda p: _ds_config(p, {"bf16": {"enabled": "false"}})),
    ("ds-steps-per-print-text", "steps_per_print must be a positive whole number",
     lambda p: _ds_config(p, {"steps_per_print": "10"})),
    ("ds-bucket-text", "reduce_bucket_size", lambda p: _ds_config(p, {"zero_optimization": {
        "stage": 2, "reduce_bucket_size": "big"}})),
    ("ds-nested-100000-deep", "nests deeper", lambda p: _ds_config(p, "[" * 100_000 + "]" * 100_000)),
]

HEAVY = [  # read a checkpoint or prepared data first: a few seconds each
    ("changed-model-bytes", "model.safetensors' fails its SHA-256 check",
     lambda p: _changed_ckpt_bytes(p, "model.safetensors")),
    ("changed-trainer-bytes", "trainer.pt' fails its SHA-256 check", lambda p: _changed_ckpt_bytes(p, "trainer.pt")),
    ("truncated-checkpoint", "missing or truncated",
     lambda p: (os.truncate(p.ckpt() / "optimizer.pt", 10), _resume(p))[1]),
    ("garbled-meta", "no readable meta.json", lambda p: (p.file("run/checkpoints/step_00000008/meta.json", "{"),
                                                         _resume(p))[1]),
    ("pickle-in-trainer-state", "was refused", lambda p: _plant_pickle(p, "trainer.pt")),
    ("pickle-in-optimizer-state", "was refused", lambda p: _plant_pickle(p, "optimizer.pt")),
    ("trainer-state-a-list", "trainer.pt holds a list", lambda p: _foreign_state(p, "trainer.pt")),
    ("resume-names-the-run-directory", "is a run directory, not a checkpoint",
     lambda p: ["--out-dir", str(p.run()), "--resume", str(p.run()), "--max-steps", "12", "--allow-changed", "max_steps"]),
    ("older-step-same-out-dir", "already holds step_00000008", lambda p: _resume(p, step=4)),
    ("changed-lr", "--allow-changed lr", lambda p: _resume(p, "--lr", "1e-2", "--max-steps", "12",
                                                         "--allow-changed", "max_steps")),
    ("changed-shape", "n_embd=32", lambda p: _resume(p, "--n-embd", "64", "--max-steps", "12",
                                                     "--allow-changed", "max_steps")),
    ("nothing-left-to-train", "nothing left to train", lambda p: _resume(p)),
    ("allow-unknown-setting", "unknown setting(s) max_step",
     lambda p: _resume(p, "--max-steps", "12", "--allow-changed", "max_step")),
    ("no-checkpoint-for-auto", "no checkpoint under", lambda p: ["--out-dir", str(p.root / "fresh"), "--resume", "auto"]),
    ("every-checkpoint-damaged", "none of the 2 checkpoint(s)",
     lambda p: (_overwrite(p.ckpt(4) / "trainer.pt", b"\0" * 64), _changed_ckpt_bytes(p, "trainer.pt"),
                ["--out-dir", str(p.run()), "--resume", "auto", "--max-steps", "12",
                 "--allow-changed", "max_steps"])[2]),
    ("shard-overwritten-0xff", "holds token id 65535", _damaged_shard),
    ("shard-meta-missing-dtype", "has no 'dtype'", lambda p: _meta_without(p, "dtype")),
    ("empty-corpus", "empty", lambda p: ["--train-file", p.file("empty.txt", "")]),
    ("static-state-out-of-range", "out of range", ["--tie-policy", "static", "--static-state", "0,5,0,0"]),
    ("replay-without-reference", "--reference-run", ["--tie-policy", "replay"]),
    ("vanilla-without-layers", "--vanilla-layers", ["--tie-policy", "vanilla"]),
]


def _snapshot(root: Path) -> dict[str, str]:
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in root.rglob("*") if f.is_file()}


def _check_case(tmp_path, finished, prepared, cache, args, needle):
    place = Place(tmp_path, finished, prepared)
    argv = args(place) if callable(args) else args
    if "--out-dir" not in argv:
        argv = ["--out-dir", str(tmp_path / "out"), *argv]
    before = _snapshot(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("MEGATIE_DEBUG", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    start = time.monotonic()
    r = subprocess.run([sys.executable, str(LAUNCHER), *SHAPE, "--cache-dir", cache, *argv], capture_output=True,
                       text=True, timeout=300, env=env, cwd=ROOT)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    after = _snapshot(tmp_path)
    assert {f: h for f, h in after.items() if f in before} == before, "a file that existed was changed or lost"
    assert not (tmp_path / "payload-ran").exists(), "a pickle in a checkpoint ran"
    return time.monotonic() - start


@pytest.mark.parametrize("case_id,needle,args", CHEAP, ids=[c[0] for c in CHEAP])
def test_refused_before_the_heavy_imports(tmp_path, finished, prepared, cache, case_id, needle, args):
    assert _check_case(tmp_path, finished, prepared, cache, args, needle) < 5.0


# Each of these loads torch in its process (2-3 s); the default run keeps one of every kind.
FAST_HEAVY = {"changed-model-bytes", "pickle-in-trainer-state", "trainer-state-a-list", "older-step-same-out-dir", "changed-lr",
              "every-checkpoint-damaged", "shard-overwritten-0xff", "empty-corpus", "replay-without-reference"}


@pytest.mark.parametrize("case_id,needle,args", [c if c[0] in FAST_HEAVY else pytest.param(*c, marks=pytest.mark.slow)
                                                 for c in HEAVY], ids=[c[0] for c in HEAVY])
def test_refused_after_reading_checkpoint_or_data(tmp_path, finished, prepared, cache, case_id, needle, args):
    _check_case(tmp_path, finished, prepared, cache, args, needle)


def test_table_is_large_enough():
    assert len(CHEAP) + len(HEAVY) >= 97
