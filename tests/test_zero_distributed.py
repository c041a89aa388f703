"""DeepSpeed engine on 2 CPU ranks (gloo): the same loss trajectory as the torch reference that
sees the same global batch, ranks agree on the weights, one gradient hook per tensor, resume; one
decision for every rank whatever each measures or draws (``split``: from the ranks' mean gradient Gram
matrix); a disagreement is one clear error.

Each rank is a separate process started the way DeepSpeed's launcher starts it (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT) on DeepSpeed's CPU accelerator - also where GPUs exist, so
that two ranks never need two devices; one test goes through ``deepspeed --num_gpus 2`` itself.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("deepspeed")
# Every test here starts two or more ranks (10-60 s each on two CPU cores): run with `-m slow`.
pytestmark = pytest.mark.slow

from megatie.tools.train_cli import build_parser, config_from_args  # noqa: E402
from megatie.trainer import Trainer  # noqa: E402
from zero_helper import base_args, record_losses, write_reference_run  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPER = os.path.join(ROOT, "tests", "zero_helper.py")
ZERO2 = os.path.join(ROOT, "ds_configs", "zero2.json")
WORLD = 2


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(out: str, **extra) -> dict:
    env = dict(os.environ, MEGATIE_TEST_OUT=out, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", **extra)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _start(args: list[str], out: str, world: int = WORLD, **extra) -> list[subprocess.Popen]:
    env, port = _env(out, **extra), _port()
    procs = []
    for r in range(world):
        e = dict(env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, HELPER, *args], env=e, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def _finish(procs, timeout: int) -> list[tuple[int, str, str]]:
    """``(returncode, stdout, stderr)`` per rank; ranks still running after ``timeout`` are killed."""
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            out.append((p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


def _spawn(args: list[str], out: str, timeout: int = 300, world: int = WORLD, **extra) -> list[dict]:
    """Run the helper on ``world`` ranks; return each rank's result."""
    for code, stdout, stderr in _finish(_start(args, out, world, **extra), timeout):
        assert code == 0, (stdout + stderr)[-3000:]
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(world)]


class _MergedLoader:
    """What W ranks see in one step, as one batch: rank 0's micro-batch, then rank 1's, ... The loader
    interface the trainer reads ahead through: a position (each rank's consumed samples, equal on all
    ranks) and the batch at a position."""

    def __init__(self, data, micro, seed, world=WORLD):
        self.loaders = [data.train_loader(micro, seed, r, world) for r in range(world)]
        self.micro_batch, self.consumed_samples = micro, 0

    def batch_at(self, consumed_samples):
        return torch.cat([loader.batch_at(consumed_samples) for loader in self.loaders])

    def __next__(self):
        batch = self.batch_at(self.consumed_samples)
        self.consumed_samples += self.micro_batch
        return batch

    def state_dict(self):
        return {**self.loaders[0].state_dict(), "consumed_samples": self.consumed_samples}


def _reference_losses(out, reference, micro=2, steps=104, world=WORLD):
    args = base_args(out, reference, steps=steps, batch=micro * world)
    trainer = Trainer(config_from_args(build_parser().parse_args(args)))
    trainer.loader = _MergedLoader(trainer.data, micro, trainer.cfg.run.seed, world)
    losses = record_losses(trainer)
    trainer.train()
    return losses


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return write_reference_run(str(tmp_path_factory.mktemp("ref")))


def test_two_ranks_zero2_fp32_match_reference_and_agree(tmp_path, reference):
    # Waves of at most 4 messages: the regroups' point-to-point exchanges take many waves.
    results = _spawn(base_args(str(tmp_path / "run"), reference) + ["--deepspeed", ZERO2], str(tmp_path / "res"),
                     MEGATIE_TEST_WAVE_MESSAGES="4")
    expected = _reference_losses(str(tmp_path / "ref"), reference)
    r0, r1 = results
    assert r0["regroups"] >= 6 and len(r0["losses"]) >= 100
    assert r0["losses"] == r1["losses"]  # both ranks report the global mean
    rel = max(abs(a - b) / abs(b) for a, b in zip(r0["losses"], expected))
    assert rel <= 1e-6, rel
    assert r0["hash"] == r1["hash"], "ranks ended with different weights"
    assert set(r0["hooks"].values()) == {1} and set(r1["hooks"].values()) == {1}


# The worst cases for a regroup's memory: everything untied at once (every block's state taken from one
# source), everything tied at once, everything untied again.
WORST = [[0, 1, 1, 3, 3, 5], [0, 1, 2, 3, 4, 5], [0, 0, 0, 0, 0, 0], [0, 1, 2, 3, 4, 5]]


@pytest.mark.parametrize("world", [2, 4])
def test_worst_case_regroups_are_exact_and_measured(tmp_path, world):
    """On 2 and 4 ranks: the same losses as the torch reference over the worst-case regroups, the same
    weights on every rank, and each regroup's measured transient (DeepSpeed's buffers included) within
    one share of the new optimizer state - the old and new weight buffers are never alive together, and
    no copy of the carried state is made besides the new state itself."""
    reference = write_reference_run(str(tmp_path / "worst"), WORST)
    args = base_args(str(tmp_path / "run"), reference, steps=50) + ["--deepspeed", ZERO2]
    results = _spawn(args, str(tmp_path / "res"), timeout=600, world=world)
    expected = _reference_losses(str(tmp_path / "ref"), reference, steps=50, world=world)
    assert len({r["hash"] for r in results}) == 1, "ranks ended with different weights"
    assert all(r["losses"] == results[0]["losses"] for r in results)
    assert max(abs(a - b) / abs(b) for a, b in zip(results[0]["losses"], expected)) <= 1e-6
    regrouped = [d for d in results[0]["decisions"] if "regroup_seconds" in d]
    assert [d["state"] for d in regrouped] == WORST
    # The first decision unfreezes blocks 1, 3 and 5: new roots without a master, moved into the flat
    # buffer one tensor at a time.
    for d in regrouped:
        assert d["regroup_transient_source"] == "tensors"
        allowed = d["optimizer_state_bytes"] / world + 8192
        assert 0 <= d["regroup_transient_bytes"] <= allowed, (d["state"], d["regroup_transient_bytes"], allowed)


def test_two_ranks_resume_across_regroups_is_exact(tmp_path, reference):
    full = str(tmp_path / "full")
    args = base_args(full, reference, steps=40) + ["--deepspeed", ZERO2, "--checkpoint-every", "18",
                                                    "--keep-checkpoints", "4"]
    a = _spawn(args, str(tmp_path / "a"))[0]
    ckpt = os.path.join(full, "checkpoints", "step_00000018")
    assert os.path.isfile(os.path.join(ckpt, "meta.json"))
    assert len([f for f in os.listdir(ckpt) if f.startswith("zero_rank_")]) == WORLD
    part = str(tmp_path / "part")
    b = _spawn(base_args(part, reference, steps=40) + ["--deepspeed", ZERO2, "--resume", ckpt],
               str(tmp_path / "b"))
    # The checkpoint of a 2-rank ZeRO-2 run exports complete: the same weights as either rank's model.
    from megatie.tools.export import export_run, load_run
    from zero_helper import weights_hash

    export_run(full, str(tmp_path / "exported"), "final", "compact")
    assert weights_hash(load_run(full, "final")[0]) == a["hash"]
    assert len(b[0]["losses"]) == 40 - 18
    tail = a["losses"][18:]
    assert max(abs(x - y) / abs(x) for x, y in zip(tail, b[0]["losses"])) <= 1e-6
    assert a["hash"] == b[0]["hash"] == b[1]["hash"]


@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not installed")
def test_deepspeed_launcher_two_ranks(tmp_path):
    """The documented command: ``deepspeed --num_gpus 2 launchers/train_gpt2.py --deepspeed ...``."""
    out = str(tmp_path / "run")
    cmd = ["deepspeed", "--num_gpus", str(WORLD), "--master_port", str(_port()),
           os.path.join(ROOT, "launchers", "train_gpt2.py"), "--deepspeed", ZERO2, "--out-dir", out,
           "--max-steps", "8", "--n-layer", "4", "--n-embd", "32", "--n-head", "2", "--seq-len", "16",
           "--batch-size", "2", "--vocab-size", "512", "--tie-every", "3", "--eval-batches", "1", "--no-progress",
           "--tie-policy", "qlearning"]
    proc = subprocess.run(cmd, env=_env(out), cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["steps"] == 8 and summary["world_size"] == WORLD and summary["decisions"] == 2


# --------------------------------------------------------------------------- one decision for every rank
def _qlearning_args(out: str, *extra: str) -> list[str]:
    return ["--out-dir", out, "--max-steps", "16", "--n-layer", "6", "--n-embd", "32", "--n-head", "2",
            "--seq-len", "16", "--batch-size", "2", "--vocab-size", "512", "--tie-policy", "qlearning",
            "--tie-every", "5", "--eval-every", "100000", "--eval-batches", "1", *(extra or ["--no-checkpoints"]),
            "--no-progress", "--seed", "7", "--deepspeed", ZERO2, "--dist-timeout-s", "120"]


def test_ranks_follow_one_decision_despite_own_seed_and_reward(tmp_path):
    """Rank 1 starts from another seed (its own agent, exploration draws, data order), its agent
    drifts after start-up, and it measures a reward 5.0 higher: every rank still applies rank 0's
    decisions, records the same averaged reward, and ends with the same weights; the regroup's
    carried state stays sharded."""
    r0, r1 = _spawn(_qlearning_args(str(tmp_path / "run")), str(tmp_path / "res"),
                    MEGATIE_TEST_RANK1_ARGS="--seed 99", MEGATIE_TEST_RANK1_REWARD_OFFSET="5.0",
                    MEGATIE_TEST_RANK1_DRIFT_AGENT="1")
    d0, d1 = r0["decisions"], r1["decisions"]
    assert [d["step"] for d in d0] == [5, 10, 15]
    assert [d["state"] for d in d0] == [d["state"] for d in d1]
    assert [d["reward"] for d in d0] == [d["reward"] for d in d1]
    assert r0["hash"] == r1["hash"]
    checksums = r0["summary"]["rank_param_checksums"]
    assert len(checksums) == WORLD and len(set(checksums)) == 1
    regrouped = [d for d in d0 if "regroup_seconds" in d]
    assert regrouped and all(d["regroup_transient_bytes"] <= 0.6 * d["optimizer_state_bytes"] for d in regrouped)


def test_two_ranks_split_by_the_mean_of_their_gradients(tmp_path):
    """``split`` on ZeRO-2: each rank probes its own batch; every split is the one the ranks' mean Gram
    matrix calls for (not rank 0's own), every rank applies it, and the budget holds throughout."""
    out = str(tmp_path / "run")
    args = _qlearning_args(out)
    args[args.index("qlearning")] = "split"
    r0, r1 = _spawn(args + ["--param-budget", "0.6"], str(tmp_path / "res"))
    from megatie.tying.gradient_probe import group_conflict

    splits = [d for d in r0["decisions"] if "split_group" in d]
    assert len(splits) >= 2 and len(r0["own_grams"]) == len(r1["own_grams"]) == len(splits)
    for d, g0, g1 in zip(splits, r0["own_grams"], r1["own_grams"]):
        mean = (torch.tensor(g0, dtype=torch.float64) + torch.tensor(g1, dtype=torch.float64)) / 2
        assert d["split_conflict"] == pytest.approx(group_conflict(mean, d["split_group"]), rel=1e-9)
        own = group_conflict(torch.tensor(g0, dtype=torch.float64), d["split_group"])
        assert d["split_conflict"] != pytest.approx(own, rel=1e-6)  # rank 0's batch alone decides otherwise
    assert [d["state"] for d in r0["decisions"]] == [d["state"] for d in r1["decisions"]]
    assert r0["hash"] == r1["hash"]
    budget = 0.6 * r0["summary"]["conventional_trainable_params"]
    assert all(d["trainable_params"] <= budget for d in r0["decisions"])


def _errors_of_every_rank(tmp_path, *extra, **fault) -> list[str]:
    """Each rank's one ``error:`` line; each must have exited with status 2, without a traceback."""
    procs = _start(_qlearning_args(str(tmp_path / "run")) + list(extra), str(tmp_path / "res"), **fault)
    errors = []
    for code, _, stderr in _finish(procs, timeout=180):
        assert code == 2, stderr[-3000:]
        lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
        errors.append(lines[0])
    return errors


def _fails_on_every_rank(tmp_path, **fault) -> str:
    errors = _errors_of_every_rank(tmp_path, **fault)
    assert errors[0] == errors[1]
    return errors[0]


def test_a_rank_that_decides_alone_is_one_clear_error(tmp_path):
    error = _fails_on_every_rank(tmp_path, MEGATIE_TEST_RANK1_OWN_DECISION="1")
    assert "ranks disagree on the tie state of decision 0" in error
    assert "rank 0: [0, " in error and "rank 1: [0, 1, 2, 3, 4, 5]" in error


def test_ranks_with_different_weights_are_one_clear_error(tmp_path):
    error = _fails_on_every_rank(tmp_path, MEGATIE_TEST_RANK1_NUDGE_WEIGHT="1")
    assert "ranks disagree on the weights after decision 0 (parameter checksum)" in error


def test_two_ranks_resume_a_learning_agent_exactly(tmp_path):
    """Each rank measures its reward on its own batches: every rank's stream is saved and restored,
    so the resumed run takes the same decisions on the same rewards as the uninterrupted one."""
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    a = _spawn(_qlearning_args(full, "--checkpoint-every", "8", "--keep-checkpoints", "4"), str(tmp_path / "a"))[0]
    ckpt = os.path.join(full, "checkpoints", "step_00000008")
    b = _spawn(_qlearning_args(part, "--resume", ckpt, "--checkpoint-every", "100"), str(tmp_path / "b"))[0]
    fields = ("step", "state", "reward", "explored")
    assert [[d[k] for k in fields] for d in b["decisions"]] == [[d[k] for k in fields] for d in a["decisions"]]
    assert a["hash"] == b["hash"]


def test_a_stalled_rank_ends_in_one_line_not_a_hang(tmp_path):
    """Rank 1 stalls longer than --dist-timeout-s: rank 0's collective times out, rank 1 then finds its
    peer gone; each ends with one line, within seconds of the timeout."""
    start = time.monotonic()
    errors = _errors_of_every_rank(tmp_path, "--dist-timeout-s", "15", MEGATIE_TEST_RANK1_STALL_S="45")
    assert all("a collective failed" in e and "--dist-timeout-s 15" in e for e in errors)
    assert errors[0].startswith("error: rank 0:") and errors[1].startswith("error: rank 1:")
    assert time.monotonic() - start < 150


def test_a_peer_stalled_inside_a_step_ends_every_rank_within_the_timeout(tmp_path):
    """Rank 1 stops inside a training step, so rank 0 waits in ZeRO's gradient reduction - on DeepSpeed's
    own group, which had torch's 30-minute default: each rank now ends in one line near the timeout."""
    start = time.monotonic()
    errors = _errors_of_every_rank(tmp_path, "--dist-timeout-s", "15", MEGATIE_TEST_RANK1_STALL_IN_STEP_S="40")
    assert all("a collective failed" in e for e in errors), errors
    assert time.monotonic() - start < 150


def test_one_ranks_full_disk_ends_every_rank_in_one_line(tmp_path):
    """Rank 1 cannot write its optimizer slice: both ranks learn it at once (no wait for the timeout), say
    it in one line, and no half-written checkpoint is left."""
    start = time.monotonic()
    procs = _start(_qlearning_args(str(tmp_path / "run"), "--checkpoint-every", "8"), str(tmp_path / "res"),
                   MEGATIE_TEST_RANK1_DISK_FULL="1")
    results = _finish(procs, timeout=180)
    both = "\n---\n".join(stderr[-1500:] for _, _, stderr in results)
    for code, _, stderr in results:
        lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert code == 2 and len(lines) == 1 and "Traceback" not in stderr, both
        assert "rank 1 could not write its optimizer slice" in lines[0] and "is the disk full" in lines[0], both
    assert time.monotonic() - start < 100
    assert not any(n.startswith(".") for n in os.listdir(tmp_path / "run" / "checkpoints"))


def test_two_ranks_relaxed_ties_agree_and_follow_the_torch_engine(tmp_path, reference):
    """Deltas and per-position norms regrouped on two ranks: equal weights on both, the single-process
    reference followed (within the SVD's sensitivity, see test_zero.py's delta test)."""
    relax = ["--tie-relax", "norms,lora:4"]
    results = _spawn(base_args(str(tmp_path / "run"), reference, steps=40) + relax + ["--deepspeed", ZERO2],
                     str(tmp_path / "res"))
    args = base_args(str(tmp_path / "ref"), reference, steps=40, batch=2 * WORLD) + relax
    trainer = Trainer(config_from_args(build_parser().parse_args(args)))
    trainer.loader = _MergedLoader(trainer.data, 2, trainer.cfg.run.seed)
    expected = record_losses(trainer)
    trainer.train()
    r0, r1 = results
    assert r0["regroups"] >= 3 and r0["hash"] == r1["hash"], "ranks ended with different weights"
    assert max(abs(a - b) / abs(b) for a, b in zip(r0["losses"], expected)) <= 1e-4
