#!/usr/bin/env python
"""Train from prepared shards with the `deepspeed` launcher on N ranks, and resume exactly after a kill.

    python benchmarks/train_from_shards.py --data-dir data/lm1b --small-data-dir data/lm1b-10M \
        --ranks 2 --out train_from_shards.json

For ``--data-dir`` (and ``--small-data-dir``, to compare start-up) one uninterrupted run of the launcher
(ZeRO-2, the paper's agent deciding every ``--tie-every`` steps, so regroups happen), recording its
set-up time, data set-up time and losses. For ``--data-dir`` a second run is killed (``kill -9`` of the
launcher's process group) after its checkpoint at ``--checkpoint-every`` and before the next regroup
has been reached twice, then resumed with ``--resume auto``: its losses after the checkpoint and its
final weights (one checksum per rank) are compared with the uninterrupted run's. Runs go to a temporary
directory that is removed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import _port  # noqa: E402


def _cmd(args, data_dir: str, out: Path, *extra: str) -> list[str]:
    return ["deepspeed", "--num_gpus", str(args.ranks), "--master_port", str(_port()),
            str(ROOT / "launchers" / "train_gpt2.py"), "--deepspeed", str(ROOT / "ds_configs" / "zero2.json"),
            "--data-dir", data_dir, "--out-dir", str(out), "--preset", "tiny", "--tie-policy", "qlearning",
            "--max-steps", str(args.steps), "--tie-every", str(args.tie_every),
            "--checkpoint-every", str(args.checkpoint_every), "--eval-every", str(args.steps),
            "--eval-batches", "4", "--log-every", "1", "--no-progress", *extra]


def _env() -> dict:
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows if r.get("event") == "train"}


def full_run(args, data_dir: str, out: Path) -> dict:
    t0 = time.time()
    subprocess.run(_cmd(args, data_dir, out), env=_env(), check=True, capture_output=True, text=True)
    summary = json.loads((out / "summary.json").read_text())
    return {"wall_s": round(time.time() - t0, 1), "setup_s": round(summary["setup_s"], 3),
            "data_setup_s": round(summary["data_setup_s"], 4), "regroups": summary["regroups"],
            "final_val_ppl": summary["final_val_ppl"], "checksums": summary["rank_param_checksums"],
            "losses": _losses(out)}


def killed_then_resumed(args, data_dir: str, out: Path) -> dict:
    ckpt = out / "checkpoints" / f"step_{args.checkpoint_every:08d}"
    p = subprocess.Popen(_cmd(args, data_dir, out), env=_env(), start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (ckpt / "meta.json").exists():
        if p.poll() is not None:
            raise RuntimeError("the run ended before its checkpoint")
        time.sleep(0.1)
    time.sleep(args.kill_delay)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    killed_at = max(_losses(out))
    subprocess.run(_cmd(args, data_dir, out, "--resume", "auto"), env=_env(), check=True, capture_output=True,
                   text=True)
    summary = json.loads((out / "summary.json").read_text())
    return {"killed_after_step": killed_at, "checksums": summary["rank_param_checksums"], "losses": _losses(out)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--small-data-dir", help="a smaller prepared corpus, to compare start-up with")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--tie-every", type=int, default=20)
    ap.add_argument("--checkpoint-every", type=int, default=30)
    ap.add_argument("--kill-delay", type=float, default=1.0, help="seconds after the checkpoint")
    ap.add_argument("--out", default="train_from_shards.json")
    args = ap.parse_args(argv)
    if shutil.which("deepspeed") is None:
        print("error: the deepspeed launcher is not installed", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="megatie-shards-"))
    try:
        result = {"data_dir": args.data_dir, "ranks": args.ranks, "steps": args.steps, "tie_every": args.tie_every,
                  "checkpoint_every": args.checkpoint_every}
        full = full_run(args, args.data_dir, work / "full")
        resumed = killed_then_resumed(args, args.data_dir, work / "killed")
        after = [s for s in full["losses"] if s > args.checkpoint_every]
        result["full"] = {k: v for k, v in full.items() if k != "losses"}
        result["resume"] = {
            "killed_after_step": resumed["killed_after_step"],
            "steps_compared": len(after),
            "max_loss_difference": max(abs(full["losses"][s] - resumed["losses"][s]) for s in after),
            "same_final_weights": resumed["checksums"] == full["checksums"],
        }
        if args.small_data_dir:
            small = full_run(args, args.small_data_dir, work / "small")
            result["small"] = {k: v for k, v in small.items() if k not in ("losses", "checksums")}
            result["data_setup_ratio_big_over_small"] = round(full["data_setup_s"] / small["data_setup_s"], 3)
            result["setup_ratio_big_over_small"] = round(full["setup_s"] / small["setup_s"], 3)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
