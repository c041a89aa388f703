"""``kill -9`` in the middle of a checkpoint write - of the only rank, of one of two ranks, of the
``deepspeed`` launcher - then ``--resume auto``: the run continues from the newest checkpoint that
verifies and ends with exactly the weights of a run that was never interrupted, with one metrics
row per step. Real processes, real signals; the write is paused at a known point so that the kill
lands inside it every time."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("deepspeed")

from test_zero_distributed import HELPER, ROOT, ZERO2, _env, _port  # noqa: E402
from zero_helper import base_args, write_reference_run  # noqa: E402

STEPS, EVERY, PAUSED = 24, 8, 16


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return write_reference_run(str(tmp_path_factory.mktemp("ref")))


def _args(out, reference, *extra):
    return base_args(out, reference, steps=STEPS, every=6) + ["--deepspeed", ZERO2, "--checkpoint-every", str(EVERY),
                                                              "--keep-checkpoints", "5", "--dist-timeout-s", "60",
                                                              *extra]


def _ranks(world, args, res, **extra):
    env, port = _env(res, **extra), _port()
    return [subprocess.Popen([sys.executable, HELPER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
            for r in range(world)]


def _launcher(world, args, res, **extra):
    cmd = ["deepspeed", "--num_gpus", str(world), "--master_port", str(_port()), HELPER, *args]
    return subprocess.Popen(cmd, env=_env(res, **extra), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait(procs, timeout):
    deadline, outputs = time.monotonic() + timeout, []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=max(deadline - time.monotonic(), 1))
            outputs.append((p.returncode, stdout + stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outputs


def _result(res, world):
    return [json.load(open(os.path.join(res, f"rank{r}.json"))) for r in range(world)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, reference):
    """Final weights of runs never stopped, per world size."""
    hashes = {}

    def of(world):
        if world not in hashes:
            base = tmp_path_factory.mktemp(f"full{world}")
            for code, text in _wait(_ranks(world, _args(str(base / "run"), reference), str(base / "res")), 300):
                assert code == 0, text[-3000:]
            hashes[world] = _result(str(base / "res"), world)[0]["hash"]
        return hashes[world]
    return of


@pytest.mark.slow  # about 40 s per case on two CPU cores
@pytest.mark.parametrize("world,victim", [(1, "rank 0"), (2, "rank 0"), (2, "rank 1"), (2, "launcher")])
def test_kill_during_checkpoint_write_then_resume(tmp_path, reference, uninterrupted, world, victim):
    if victim == "launcher" and shutil.which("deepspeed") is None:
        pytest.skip("the deepspeed launcher is not installed")
    out, res = str(tmp_path / "run"), str(tmp_path / "killed")
    pause = {"MEGATIE_TEST_PAUSE_IN_SAVE": str(PAUSED)}
    procs = [_launcher(world, _args(out, reference), res, **pause)] if victim == "launcher" else \
        _ranks(world, _args(out, reference), res, **pause)
    deadline = time.monotonic() + 240
    while not all(os.path.exists(os.path.join(res, f"paused-rank{r}")) for r in range(world)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "the run never reached its pause"
        time.sleep(0.2)
    target = procs[0] if victim in ("launcher", "rank 0") else procs[1]
    os.kill(target.pid, signal.SIGKILL)
    start = time.monotonic()
    outputs = _wait(procs, 120)  # every rank ends by itself: no hang, no orphan
    assert time.monotonic() - start < 60, outputs
    survivors = [text for p, (code, text) in zip(procs, outputs) if p is not target]
    assert all("Traceback" not in text for text in survivors), survivors
    ckpts = os.path.join(out, "checkpoints")
    assert not os.path.exists(os.path.join(ckpts, f"step_{PAUSED:08d}"))  # the interrupted write left no checkpoint

    resumed = str(tmp_path / "resumed")
    for code, text in _wait(_ranks(world, _args(out, reference, "--resume", "auto"), resumed), 300):
        assert code == 0, text[-3000:]
    results = _result(resumed, world)
    assert all(r["hash"] == uninterrupted(world) for r in results)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows if r["event"] == "resume"] == [PAUSED - EVERY]
    assert [r["step"] for r in rows if r["event"] == "train"] == list(range(1, STEPS + 1))
