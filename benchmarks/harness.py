"""What the training benchmarks share: one run per variant, each in fresh processes (one per rank,
started the way DeepSpeed's launcher starts them), through the same engine factory the launcher uses.

- No checkpoints are written (``--no-checkpoints``) and every run directory is temporary and removed
  on any exit, SIGTERM included: a benchmark leaves nothing behind.
- ``settings`` are the run's flags (model shape, batch, steps, ``activation_checkpointing``, ...);
  both variants of a comparison get the same ones, and the result JSON records them.
- On CPU a *tensor probe* adds up the bytes of every tensor reachable from the engine after each
  backward and at each regroup's peak (carried state included): the memory tying saves, without the
  interpreter and libraries that dominate a CPU process's RSS. On CUDA the allocator's own peak
  (folded across DeepSpeed's counter resets), the reserved peak and NVML samples are the figures,
  and the probe is off (walking a 1.5B-parameter engine after every backward would cost seconds).

    python benchmarks/harness.py --variant megatie --settings '{...}' --ds-config ds_configs/zero2.json --out r.json
runs one rank of one variant (the benchmarks call it; RANK/WORLD_SIZE come from the environment).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# What each variant passes to the launcher: the paper's agent ("megatie"), the default policy, and the
# default with rank-8 deltas on every tied position (relaxed ties: their parameters and moments count too).
POLICY = {"conventional": ["--tie-policy", "conventional"], "megatie": ["--tie-policy", "qlearning"],
          "split": ["--tie-policy", "split"], "split-lora8": ["--tie-policy", "split", "--tie-relax", "lora:8"],
          "split-auto": ["--tie-policy", "split", "--tie-relax", "lora:auto"]}
SHAPE_FLAGS = ("n_layer", "n_embd", "n_head", "seq_len", "batch_size", "vocab_size", "max_steps", "tie_every")
_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@contextmanager
def scratch_dir(prefix: str = "megatie-bench-"):
    """A temporary directory removed on any exit: exceptions, Ctrl-C and SIGTERM alike."""
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        with tempfile.TemporaryDirectory(prefix=prefix) as path:
            yield path
    finally:
        signal.signal(signal.SIGTERM, previous)


class TensorProbe:
    """Engine observer: tensor bytes after every backward (gradients alive, activations freed) and at
    every regroup's measured peak (the bytes reachable from the engine when it began plus the most they
    rose during it, ``megatie.metrics.live_bytes``)."""

    def __init__(self):
        self.samples: list[int] = []

    def after_backward(self, engine) -> None:
        from megatie.metrics.live_bytes import reachable_storage_bytes

        self.samples.append(reachable_storage_bytes(engine))

    def at_regroup_peak(self, engine, peak_bytes: int) -> None:
        self.samples.append(peak_bytes)


def train_argv(variant: str, settings: dict, out_dir: str, seed: int, ds_config: str | None) -> list[str]:
    argv = ["--out-dir", out_dir, *POLICY[variant], "--seed", str(seed), "--no-progress",
            "--no-checkpoints", "--eval-every", str(10 ** 6), "--eval-batches", "2", "--log-every", str(10 ** 6)]
    for key in SHAPE_FLAGS:
        argv += [f"--{key.replace('_', '-')}", str(settings[key])]
    if settings.get("activation_checkpointing"):
        argv.append("--activation-checkpointing")
    if settings.get("cache_dir"):
        argv += ["--cache-dir", settings["cache_dir"]]
    if ds_config:
        argv += ["--deepspeed", ds_config]
    return argv


def run_rank(variant: str, settings: dict, ds_config: str, seed: int, out_json: str) -> None:
    """One rank of one variant; rank 0 writes the figures."""
    import torch

    from megatie.tools.train_cli import build_parser, config_from_args
    from megatie.runtime.distributed import init_deepspeed_distributed, shutdown_distributed
    from megatie.trainer import Trainer

    sync = init_deepspeed_distributed()
    probe = TensorProbe() if settings.get("probe", sync.device.type != "cuda") else None
    try:
        with scratch_dir() as run_dir:
            cfg = config_from_args(build_parser().parse_args(train_argv(variant, settings, run_dir, seed, ds_config)))
            trainer = Trainer(cfg, sync=sync, observer=probe)
            summary = trainer.train()
        regroups = [d for d in trainer.controller.history if "regroup_seconds" in d]
        samples = sync.gather(probe.samples if probe else [])
        held = sync.gather(held_bytes(trainer))
        result = {
            **{k: summary[k] for k in ("peak_memory_bytes", "avg_memory_bytes", "peak_reserved_bytes",
                                       "peak_sampled_bytes", "peak_resets_folded", "memory_source",
                                       "mean_trainable_params", "final_trainable_params",
                                       "conventional_trainable_params", "mean_independent_layers",
                                       "tokens_per_second", "steps", "regroups", "regroup_seconds_mean",
                                       "step_seconds_mean", "regroup_over_step", "train_time_s",
                                       "optimizer_state_bytes", "rank_param_checksums", "precision",
                                       "model_flops_per_token", "mfu")},
            "peak_tensor_bytes": max((max(s, default=0) for s in samples), default=0),
            "avg_tensor_bytes": int(sum(sum(s) for s in samples) / max(sum(len(s) for s in samples), 1)),
            # Measured transient of the worst regroup over one rank's share of the optimizer state after it.
            "max_transient_over_rank_state": max((d["regroup_transient_bytes"] * sync.world_size
                                                  / d["optimizer_state_bytes"] for d in regroups), default=None),
            "max_regroup_transient_bytes": max((d["regroup_transient_bytes"] for d in regroups), default=None),
            "max_regroup_excess_bytes": max((d["regroup_excess_bytes"] for d in regroups), default=None),
            "regroup_transient_source": regroups[0]["regroup_transient_source"] if regroups else None,
            # What one rank holds at the end: its weights (whole, or its ZeRO-3 partitions) and its masters
            # and moments; the largest of any rank.
            "rank_weight_bytes": max(w for w, _ in held), "rank_optimizer_bytes": max(o for _, o in held),
            "activation_checkpointing": trainer.cfg.engine.activation_checkpointing,
            "world_size": sync.world_size, "device": str(sync.device),
            "device_name": torch.cuda.get_device_name(sync.device) if sync.device.type == "cuda" else "cpu",
        }
        if sync.is_main:
            with open(out_json, "w") as f:
                json.dump(result, f)
    finally:
        shutdown_distributed()


def held_bytes(trainer) -> tuple[int, int]:
    """(weight bytes, master + moment bytes) this rank holds."""
    from megatie.tying.layers import local_part, unique_parameters

    weights = 0
    for p in unique_parameters(trainer.model):
        weights += local_part(p).numel() * p.element_size()
        if local_part(p) is not p:  # ZeRO-3: a tensor kept whole besides its partition (below the threshold)
            weights += p.numel() * p.element_size()
    engine = trainer.engine
    state = engine.optimizer_state_bytes(local=True) if trainer.cfg.uses_deepspeed else engine.optimizer_state_bytes()
    return weights, int(state)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(variant: str, settings: dict, ds_config: str, seed: int, world: int = 1, timeout: int = 3600) -> dict:
    """Run ``variant`` on ``world`` fresh rank processes; return rank 0's figures."""
    with scratch_dir() as tmp:
        out, port = os.path.join(tmp, "result.json"), _port()
        base = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
        procs = []
        for rank in range(world):
            env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--ds-config", ds_config,
                   "--seed", str(seed), "--out", out, "--settings", json.dumps(settings)]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        logs = []
        try:
            for p in procs:
                logs.append(p.communicate(timeout=timeout)[0])
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        for p, log in zip(procs, logs):
            if p.returncode != 0:
                raise RuntimeError(f"{variant} ({world} rank{'s' if world > 1 else ''}) failed:\n{log[-4000:]}")
        with open(out) as f:
            return json.load(f)


def side_by_side(settings: dict, ds_config: str, seed: int, world: int = 1,
                 variants=("conventional", "megatie")) -> dict:
    """Each variant in its own processes, same settings, same seed."""
    return {variant: spawn(variant, settings, ds_config, seed, world) for variant in variants}


def write_json(path: str | None, obj: dict) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="one rank of one benchmark variant")
    p.add_argument("--variant", choices=sorted(POLICY), required=True)
    p.add_argument("--settings", required=True)
    p.add_argument("--ds-config", required=True)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    run_rank(args.variant, json.loads(args.settings), args.ds_config, args.seed, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
