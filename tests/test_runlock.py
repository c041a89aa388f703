"""One run per run directory: a second run is refused at once, a killed run's lock is taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatie.runtime.runlock import LOCK_NAME, RunLock, RunLockedError

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "launchers" / "train_gpt2.py"


def _write_lock(out: Path, **holder) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "start": None, "since": "earlier",
                                             **holder}))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_second_holder_is_refused_and_release_frees(tmp_path):
    with RunLock(str(tmp_path)):
        with pytest.raises(RunLockedError, match=f"in use by a running training run \\(pid {os.getpid()}"):
            RunLock(str(tmp_path)).acquire()
    assert not (tmp_path / LOCK_NAME).exists()
    RunLock(str(tmp_path)).acquire().release()


def test_lock_of_a_dead_process_is_stale(tmp_path):
    _write_lock(tmp_path, pid=_dead_pid())
    lock = RunLock(str(tmp_path)).acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_reused_pid_is_recognised(tmp_path):
    # The pid runs, but it is another process than the one that took the lock (its start time differs).
    _write_lock(tmp_path, pid=os.getppid(), start="1")
    RunLock(str(tmp_path)).acquire().release()


def test_lock_from_another_host_is_not_guessed_at(tmp_path):
    _write_lock(tmp_path, pid=1, host="elsewhere-node")
    with pytest.raises(RunLockedError, match="another host.*delete .*megatie.lock if that run has ended"):
        RunLock(str(tmp_path)).acquire()


def test_release_never_removes_a_lock_it_does_not_hold(tmp_path):
    lock = RunLock(str(tmp_path)).acquire()
    _write_lock(tmp_path, pid=os.getppid())  # someone else's lock replaced ours
    lock.release()
    assert (tmp_path / LOCK_NAME).exists()


def _launch(out: Path, cache: Path, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("MEGATIE_DEBUG", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.Popen([sys.executable, str(LAUNCHER), "--out-dir", str(out), "--cache-dir", str(cache),
                             "--no-progress", "--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--seq-len", "32",
                             "--vocab-size", "512", "--log-every", "1", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)


@pytest.mark.slow  # about 20 s: three training processes
def test_concurrent_run_refused_at_once_then_killed_run_resumed(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    first = _launch(out, cache, "--max-steps", "100000", "--checkpoint-every", "5", "--eval-every", "100000")
    try:
        # Any checkpoint will do: a tiny run writes and prunes them faster than a poll can watch one name.
        deadline = time.monotonic() + 180
        while not list((out / "checkpoints").glob("step_*")):
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            assert first.poll() is None, first.communicate()[1][-2000:]  # it has ended: communicate cannot block
            time.sleep(0.2)
        start = time.monotonic()
        second = _launch(out, cache, "--max-steps", "10")
        _, err = second.communicate(timeout=60)
        assert time.monotonic() - start < 5.0
        assert second.returncode == 2 and err.count("\n") == 1 and f"pid {first.pid}" in err, err
        first.send_signal(signal.SIGKILL)  # leaves its lock behind
        first.communicate()
    finally:
        if first.poll() is None:
            first.kill()
    assert (out / LOCK_NAME).exists()
    rows_before = sum(1 for _ in open(out / "metrics.jsonl"))
    newest = max(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*"))
    target = newest + 4  # however far the killed run got
    resumed = _launch(out, cache, "--resume", "auto", "--max-steps", str(target), "--allow-changed", "max_steps")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert not (out / LOCK_NAME).exists()
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train = [r["step"] for r in rows if r["event"] == "train"]
    assert train == list(range(1, target + 1)) and rows_before >= 5  # every step once: none lost, none twice
