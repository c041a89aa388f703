"""Shared pieces of the DeepSpeed tests, and a per-rank runner.

As a script it is one rank of a DeepSpeed run (started by ``deepspeed --num_gpus N`` or by the
test with RANK/WORLD_SIZE set): it takes the launcher's flags, trains, and writes
``$MEGATIE_TEST_OUT/rank<R>.json`` with the per-step losses, a hash of the final weights, the
gradient-hook count of every trainable tensor, the decision records and the gradient Gram matrices
this rank measured itself (before the ranks average them). A run that ends with a
user-facing error prints one ``error:`` line and exits with status 2, as the launcher does.

``MEGATIE_TEST_WAVE_MESSAGES`` caps the messages of one point-to-point wave of a regroup.
``MEGATIE_TEST_PAUSE_IN_SAVE=STEP``: while writing the checkpoint of STEP, every rank pauses (for a
kill) after writing its optimizer slice, before rank 0 seals the directory, and says so in a file
``paused-rank<R>`` under ``$MEGATIE_TEST_OUT``.
Faults for the rank-agreement tests, injected on rank 1 only (environment variables):
- ``MEGATIE_TEST_RANK1_ARGS``: extra flags for rank 1 (e.g. ``--seed 99``);
- ``MEGATIE_TEST_RANK1_REWARD_OFFSET``: added to every reward loss rank 1 measures;
- ``MEGATIE_TEST_RANK1_DRIFT_AGENT``: rank 1's agent drifts after start-up (its Q network and
  exploration generator change), as non-deterministic kernels or other hardware would make it;
- ``MEGATIE_TEST_RANK1_OWN_DECISION``: rank 1 ignores rank 0's first proposal and applies its own;
- ``MEGATIE_TEST_RANK1_NUDGE_WEIGHT``: rank 1 nudges one weight just after the first regroup;
- ``MEGATIE_TEST_RANK1_STALL_S``: rank 1 stalls that long just before the first regroup.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

# A replayed schedule over 6 blocks: the frozen blocks start, unties (state copied from the
# source), ties (state dropped), a root re-tied elsewhere (3 -> 2 while its members 4, 5 move to
# a new root 4), everything tied, everything untied.
SCHEDULE = [
    [0, 1, 1, 3, 3, 5],
    [0, 1, 2, 3, 3, 3],
    [0, 0, 2, 2, 4, 4],
    [0, 1, 1, 3, 4, 4],
    [0, 0, 0, 0, 0, 0],
    [0, 1, 2, 3, 4, 5],
    [0, 1, 1, 1, 4, 4],
    [0, 0, 2, 2, 2, 5],
]


def write_reference_run(directory: str, states=SCHEDULE) -> str:
    """A minimal finished-run directory that ``--tie-policy replay`` replays."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "metrics.jsonl"), "w") as f:
        for i, s in enumerate(states):
            f.write(json.dumps({"event": "decision", "decision": i, "state": s}) + "\n")
    with open(os.path.join(directory, "summary.json"), "w") as f:
        json.dump({"final_state": states[-1], "final_independent_layers": len(set(states[-1]))}, f)
    return directory


def base_args(out_dir: str, reference: str, steps: int = 104, batch: int = 2, every: int = 12) -> list[str]:
    return ["--out-dir", out_dir, "--max-steps", str(steps), "--n-layer", "6", "--n-embd", "32", "--n-head", "2",
            "--seq-len", "16", "--batch-size", str(batch), "--vocab-size", "512", "--lr", "2e-3",
            "--tie-policy", "replay", "--reference-run", reference,
            *(["--tie-every", str(every)] if every < steps else []),  # too short a run to decide: the default
            "--log-every", "1", "--eval-every", "100000", "--eval-batches", "1", "--checkpoint-every", "100000",
            "--no-progress", "--seed", "7"]


def live_cpu_tensor_bytes() -> int:
    """Bytes of every distinct live CPU tensor storage the garbage collector can see: a census that
    shares nothing with megatie's own accounting (``megatie.metrics.live_bytes``)."""
    import gc

    import torch

    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
                s = obj.untyped_storage()
                if s.data_ptr() and s.data_ptr() not in seen:
                    seen.add(s.data_ptr())
                    total += s.nbytes()
        except Exception:  # objects that refuse the checks (deprecated module attributes) hold no tensor
            continue
    return total


def weights_hash(model) -> str:
    from megatie.checkpoint.store import unique_state_dict

    h = hashlib.sha256()
    for name, t in sorted(unique_state_dict(model).items()):
        h.update(name.encode())
        h.update(t.float().numpy().tobytes())
    return h.hexdigest()


def train_recorded(args: list[str], ds_config=None, sync=None, activation_checkpointing: bool = False):
    """Train the run the launcher flags ``args`` describe (DeepSpeed with ``ds_config`` on ``sync``'s ranks,
    else the plain torch engine): ``(trainer, the loss of every step)``."""
    from megatie.tools.train_cli import build_parser, config_from_args
    from megatie.trainer import Trainer

    cfg = config_from_args(build_parser().parse_args(args))
    cfg = cfg.replace(deepspeed_config=ds_config, activation_checkpointing=activation_checkpointing)
    trainer = Trainer(cfg, sync=sync if ds_config is not None else None)
    losses = record_losses(trainer)
    trainer.train()
    return trainer, losses


def max_rel(a: list[float], b: list[float]) -> float:
    """The largest relative difference of two equally long loss curves."""
    assert len(a) == len(b)
    return max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))


def record_losses(trainer) -> list[float]:
    losses: list[float] = []
    step = trainer.engine.train_step

    def wrapped(batches):
        loss = step(batches)
        losses.append(float(loss))  # tests read every step; the trainer does not
        return loss

    trainer.engine.train_step = wrapped
    return losses


def record_own_grams(trainer) -> list[list[list[float]]]:
    """The per-block gradient Gram matrix of each probe this rank makes, as it measured it."""
    grams: list = []
    probe = trainer.controller.gradient_gram

    def recorded():
        gram = probe()
        grams.append(gram.tolist())
        return gram

    trainer.controller.gradient_gram = recorded
    return grams


def _inject_rank1_faults(trainer) -> None:
    import torch

    controller = trainer.controller
    offset = float(os.environ.get("MEGATIE_TEST_RANK1_REWARD_OFFSET", 0))
    if offset:
        measure = controller.reward_loss
        controller.reward_loss = lambda: measure() + offset
    agent = getattr(controller.policy, "agent", None)
    if os.environ.get("MEGATIE_TEST_RANK1_DRIFT_AGENT") and agent is not None:
        agent.generator.manual_seed(12345)
        with torch.no_grad():
            for p in agent.qnet.parameters():
                p.add_(torch.randn_like(p))
    if os.environ.get("MEGATIE_TEST_RANK1_OWN_DECISION"):
        broadcast = controller.sync.broadcast

        def own_decision(obj):
            proposal, delayed, policy = broadcast(obj)
            if proposal is not None and not controller.history:
                proposal.state = list(range(len(proposal.state)))  # every block independent
            return proposal, delayed, policy

        controller.sync.broadcast = own_decision
    if os.environ.get("MEGATIE_TEST_RANK1_DISK_FULL"):  # only this rank's disk: its slice cannot be written
        import megatie.engines.deepspeed_engine as deepspeed_engine

        def full(*args, **kwargs):
            raise OSError(28, "No space left on device")

        deepspeed_engine.save_zero_slice = full
    step_stall = float(os.environ.get("MEGATIE_TEST_RANK1_STALL_IN_STEP_S", 0))
    if step_stall:  # inside a step: the peer waits in DeepSpeed's gradient reduction, not in megatie's
        train_step = trainer.engine.train_step

        def stalled_step(micro_batches):
            if trainer.step == 3:
                import time

                time.sleep(step_stall)
            return train_step(micro_batches)

        trainer.engine.train_step = stalled_step
    stall = float(os.environ.get("MEGATIE_TEST_RANK1_STALL_S", 0))
    if stall:
        regroup_before_stall = controller.regroup

        def stalled(plan):
            if not controller.history:
                import time

                time.sleep(stall)
            return regroup_before_stall(plan)

        controller.regroup = stalled
    if os.environ.get("MEGATIE_TEST_RANK1_NUDGE_WEIGHT"):
        regroup = controller.regroup

        def nudged(plan):
            # After the regroup: one before it would be undone, every weight being rebuilt from the
            # fp32 masters each element of which one rank owns (megatie.engines.zero_weights).
            record = regroup(plan)
            if not controller.history:
                with torch.no_grad():
                    trainer.model.transformer.wte.weight[0, 0] += 0.5
            return record

        controller.regroup = nudged


def _pause_in_save(trainer, step: int) -> None:
    import time

    import megatie.engines.deepspeed_engine as deepspeed_engine

    save_slice = deepspeed_engine.save_zero_slice

    def paused(optimizer, rank, path):
        save_slice(optimizer, rank, path)
        if trainer.step == step:
            out = os.environ["MEGATIE_TEST_OUT"]
            os.makedirs(out, exist_ok=True)
            open(os.path.join(out, f"paused-rank{rank}"), "w").close()
            time.sleep(15)  # long enough for the test to kill; then the survivors carry on and notice

    deepspeed_engine.save_zero_slice = paused


def run(argv) -> None:
    from megatie.tools.train_cli import build_parser, config_from_args
    from megatie.runtime.distributed import failures_as_errors, init_deepspeed_distributed, shutdown_distributed

    if os.environ.get("MEGATIE_TEST_DETERMINISTIC"):
        import torch

        torch.use_deterministic_algorithms(True, warn_only=True)  # where a kernel has no deterministic variant, it warns
    if os.environ.get("MEGATIE_TEST_WAVE_MESSAGES"):  # many small waves instead of one
        import megatie.engines.zero_state as zero_state

        zero_state.WAVE_MESSAGES = int(os.environ["MEGATIE_TEST_WAVE_MESSAGES"])
    if os.environ.get("RANK") == "1":
        argv = argv + os.environ.get("MEGATIE_TEST_RANK1_ARGS", "").split()
    cfg = config_from_args(build_parser().parse_args(argv))
    sync = init_deepspeed_distributed(cfg.engine.local_rank, cfg.engine.dist_timeout_s)
    try:
        with failures_as_errors(sync, cfg.engine.dist_timeout_s):
            _train_and_record(cfg, sync)
    finally:
        shutdown_distributed()


def _train_and_record(cfg, sync) -> None:
    from megatie.trainer import Trainer

    trainer = Trainer(cfg, sync=sync)
    if os.environ.get("MEGATIE_TEST_PAUSE_IN_SAVE"):
        _pause_in_save(trainer, int(os.environ["MEGATIE_TEST_PAUSE_IN_SAVE"]))
    if sync.rank == 1:
        _inject_rank1_faults(trainer)
    losses = record_losses(trainer)
    own_grams = record_own_grams(trainer)
    summary = trainer.train()
    from megatie.engines import whole_weights
    from megatie.tying.layers import local_part

    with whole_weights(trainer.engine):  # ZeRO-3: every rank assembles the whole model to hash it
        digest = weights_hash(trainer.model)
    held = [local_part(p) for p in trainer.model.parameters()]
    result = {"rank": sync.rank, "world_size": sync.world_size, "losses": losses,
              "hash": digest, "hooks": trainer.engine.grad_hook_counts(),
              # What this rank holds of the weights and of the optimizer state, in elements and bytes
              "held_weight_numel": sum(t.numel() for t in held), "model_numel": sum(
                  getattr(p, "ds_numel", p.numel()) for p in trainer.model.parameters()),
              "held_state_bytes": sum(t.numel() * t.element_size() for t in held)
              + trainer.engine.optimizer_state_bytes(local=True) if trainer.cfg.uses_deepspeed else None,
              "regroups": trainer.engine.regroups, "decisions": trainer.controller.history, "own_grams": own_grams,
              "summary": summary}
    out = os.environ.get("MEGATIE_TEST_OUT", cfg.run.out_dir)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"rank{sync.rank}.json"), "w") as f:
        json.dump(result, f, default=str)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatie.tools.train_cli import exit_process, run_main

    exit_process(run_main(run, sys.argv[1:]))
