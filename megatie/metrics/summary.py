"""What a finished (or stopped) run reports in ``summary.json``: quality, parameters, speed, memory, structure."""

from __future__ import annotations

from megatie.runtime.distributed import param_checksum
from megatie.tying.layers import count_parameters, local_part, unique_parameters


def run_summary(trainer, memory: dict, final_val: dict) -> dict:
    """Collective: every rank calls it (memory is the most any rank used, checksums one per rank)."""
    steps = max(trainer.step, 1)
    trainable, total = count_parameters(trainer.model)
    ranks_memory = trainer.sync.gather({k: memory.get(k) for k in ("peak_bytes", "avg_bytes", "peak_reserved_bytes",
                                                                "peak_sampled_bytes")})
    most = {k: max((m[k] for m in ranks_memory if m[k] is not None), default=None) for k in ranks_memory[0]}
    return {
        "objective": trainer.objective.name,
        "final_val_ppl": final_val["ppl"],
        "final_val_loss": final_val["loss"],
        # masked-token accuracy (masked LM) or top-1 accuracy (images); None for causal LMs
        "final_val_accuracy": final_val.get("accuracy"),
        "best_val_ppl": trainer.stats["best_val_ppl"],
        "val_accuracy_at_best_val": trainer.stats["val_accuracy_at_best_val"],
        "test_ppl_at_best_val": trainer.stats["test_ppl_at_best_val"],
        "mean_trainable_params": trainer.stats["trainable_sum"] / steps,
        "final_trainable_params": trainable,
        "total_params": total,
        "conventional_trainable_params": trainer.tying.untied_parameter_count(),
        "mean_independent_layers": trainer.stats["independent_sum"] / steps,
        "final_independent_layers": trainer.tying.num_independent(),
        # split: the independent blocks its parameter budget allows (None for the other policies)
        "budget_independent_layers": getattr(trainer.policy, "max_roots", None),
        "final_state": list(trainer.tying.state),
        "decisions": len(trainer.controller.history),
        "tokens_per_second": trainer.tokens_per_second(),
        "model_flops_per_token": trainer.flops_per_token,
        "mfu": trainer.mfu(),
        "peak_flops": trainer.peak_flops,
        "train_time_s": trainer.stats["train_time"],
        "setup_s": trainer.setup_s,
        "data_setup_s": trainer.data_setup_s,
        **trainer.threads,  # CPU threads per process and why (megatie.runtime.threads)
        "peak_memory_bytes": most["peak_bytes"],
        "avg_memory_bytes": most["avg_bytes"],
        "peak_reserved_bytes": most["peak_reserved_bytes"],
        "peak_sampled_bytes": most["peak_sampled_bytes"],
        "memory_source": memory["source"],
        "peak_resets_folded": memory.get("resets_folded", 0),
        "optimizer_state_bytes": trainer.engine.optimizer_state_bytes(),
        "regroups": int(trainer.stats["regroups"]),
        "regroup_seconds_mean": (trainer.stats["regroup_time"] / trainer.stats["regroups"]
                                 if trainer.stats["regroups"] else None),
        "step_seconds_mean": trainer.stats["step_time"] / steps,
        "regroup_over_step": _regroup_over_step(trainer),
        # Measured (megatie.metrics.live_bytes): the most one rank's live bytes rose during a regroup.
        "regroup_transient_bytes_max": trainer.stats.get("regroup_transient_max") if trainer.stats["regroups"] else None,
        "regroup_transient_source": (("allocator" if trainer.device.type == "cuda" else "tensors")
                                     if trainer.stats["regroups"] else None),
        # Of what each rank holds: the weights themselves, or (ZeRO-3) its own partitions of them.
        "rank_param_checksums": trainer.sync.gather(param_checksum(local_part(p)
                                                                   for p in unique_parameters(trainer.model))),
        "steps": trainer.step,
        "engine": "deepspeed" if trainer.cfg.uses_deepspeed else "torch",
        "precision": trainer.cfg.engine.precision,
        **trainer.speed,
        "tie_policy": trainer.cfg.tying.tie_policy,
        "tie_mode": trainer.cfg.tying.tie_mode,
        "reward": trainer.cfg.tying.reward,
        "n_layer": trainer.facts.n_layer,
        "world_size": trainer.world_size,
    }


def _regroup_over_step(trainer) -> float | None:
    """Mean regroup time over mean training-step time (None before any regroup)."""
    if not trainer.stats["regroups"] or not trainer.step:
        return None
    return (trainer.stats["regroup_time"] / trainer.stats["regroups"]) / max(trainer.stats["step_time"] / trainer.step, 1e-12)
