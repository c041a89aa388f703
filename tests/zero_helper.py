"""Shared pieces of the DeepSpeed tests, and a per-rank runner.

As a script it is one rank of a DeepSpeed run (started by ``deepspeed --num_gpus N`` or by the
test with RANK/WORLD_SIZE set): it takes the launcher's flags, trains, and writes
``$MEGATIE_TEST_OUT/rank<R>.json`` with the per-step losses, a hash of the final weights and the
gradient-hook count of every trainable tensor.
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
            "--tie-policy", "replay", "--reference-run", reference, "--tie-every", str(every),
            "--log-every", "1", "--eval-every", "100000", "--eval-batches", "1", "--checkpoint-every", "100000",
            "--no-progress", "--seed", "7"]


def weights_hash(model) -> str:
    from megatie.checkpoint import unique_state_dict

    h = hashlib.sha256()
    for name, t in sorted(unique_state_dict(model).items()):
        h.update(name.encode())
        h.update(t.float().numpy().tobytes())
    return h.hexdigest()


def record_losses(trainer) -> list[float]:
    losses: list[float] = []
    step = trainer.engine.train_step

    def wrapped(batches):
        loss = step(batches)
        losses.append(loss)
        return loss

    trainer.engine.train_step = wrapped
    return losses


def main(argv=None) -> None:
    from functools import partial

    import torch.distributed as tdist

    from megatie.cli import build_parser, config_from_args, init_deepspeed_distributed
    from megatie.trainer import Trainer
    from megatie.zero import DeepSpeedEngine

    args = build_parser().parse_args(argv)
    rank, world, device = init_deepspeed_distributed(args.local_rank)
    trainer = Trainer(config_from_args(args), rank=rank, world_size=world, barrier=tdist.barrier,
                      engine_factory=partial(DeepSpeedEngine, ds_config=args.deepspeed,
                                             activation_checkpointing=args.activation_checkpointing),
                      device=device)
    losses = record_losses(trainer)
    summary = trainer.train()
    result = {"rank": rank, "world_size": world, "losses": losses, "hash": weights_hash(trainer.model),
              "hooks": trainer.engine.grad_hook_counts(), "regroups": trainer.engine.regroups,
              "steps": summary["steps"], "final_state": summary["final_state"]}
    out = os.environ.get("MEGATIE_TEST_OUT", args.out_dir)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    tdist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(sys.argv[1:])
