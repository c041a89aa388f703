"""The training loop: data, model, tying controller, an optimisation engine, logs, checkpoints.

Read top to bottom: ``Trainer.__init__`` builds everything (resuming if asked), ``train()`` runs
the schedule and writes ``summary.json``. The optimisation itself lives in an *engine* built by
``megatie.engines.build_engine``: plain torch in one process (the reference) or DeepSpeed ZeRO on
any number of ranks; both expose ``train_step``, ``regroup``, ``lr``, ``state_dict``,
``save_checkpoint``. Ranks agree through ``megatie.distributed.RankSync``.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from dataclasses import asdict

import torch
from tqdm.auto import tqdm

from megatie.agent import AgentConfig
from megatie.checkpoint import load_checkpoint, load_model_tensors, prune_checkpoints, replace_dir, step_name
from megatie.config import TrainConfig
from megatie.controller import TieController
from megatie.distributed import RankSync, param_checksum
from megatie.engines import build_engine
from megatie.errors import CheckpointError, ConfigError, DivergedError
from megatie.interrupts import raise_if_requested
from megatie.flops import mfu, model_flops_per_token, peak_flops
from megatie.memory import MemoryMonitor
from megatie.metrics import MetricsLogger, write_json_atomic
from megatie.objectives import objective_for
from megatie.policies import build_policy, load_reference_run
from megatie.resume import (adopt_unset, check_engine, check_max_steps, check_settings, check_timeline,
                            choose_checkpoint, set_aside_damaged, truncate_metrics)
from megatie.speed import prepare_for_speed
from megatie.state import num_independent
from megatie.tying import LayerTying, count_parameters, unique_parameters
from megatie.vocab import build_lm

# Each rank draws its reward batches from its own stream (rank 0's is the single-process one).
_RANK_STREAM = 7919


class Trainer:
    def __init__(self, cfg: TrainConfig, sync: RankSync | None = None, device: torch.device | None = None,
                 observer=None):
        started = time.perf_counter()
        self.sync = sync or RankSync()
        rank, world_size = self.rank, self.world_size = self.sync.rank, self.sync.world_size
        self.device = device or self.sync.device
        # Read the checkpoint first: a bad one fails before any expensive setup, and settings left
        # unset on the command line continue as the checkpoint had them.
        checkpoint = self._open_checkpoint(cfg.resume, cfg.out_dir) if cfg.resume else None
        if checkpoint is not None:
            cfg = adopt_unset(cfg, checkpoint[2]["settings"])
        reference = load_reference_run(cfg.reference_run) if cfg.reference_run else None
        if cfg.tie_policy == "vanilla":
            layers = cfg.vanilla_layers or (reference or {}).get("summary", {}).get("final_independent_layers")
            if not layers:
                raise ConfigError("tie policy 'vanilla' needs --vanilla-layers N or --reference-run DIR")
            cfg.n_layer = int(layers)
        self.cfg = cfg = cfg.resolved()
        torch.manual_seed(cfg.seed)
        if checkpoint is not None:
            self._check_checkpoint_fits(checkpoint)

        from megatie.models import get_spec

        spec = get_spec(cfg.model)
        # The objective reads the data and records what it decides (vocabulary, classes, image shape).
        self.objective = objective_for(spec, cfg)
        self.data = self.objective.build_data(rank, world_size, self.sync.barrier)
        self.data_setup_s = time.perf_counter() - started   # must not grow with the corpus (no full scan)
        self.model = build_lm(spec, vars(cfg), seed=cfg.seed, device=self.device, pad_to=cfg.pad_vocab_to)
        self.tying = LayerTying(self.model, cfg.tie_mode, block_path=spec.block_path)
        self.flops_per_token = model_flops_per_token(self.model, self.tying.untied_parameter_count(),
                                                     cfg.n_layer, cfg.n_embd, cfg.seq_len)
        self.peak_flops = None  # no MFU on a CPU
        if self.device.type == "cuda":
            self.peak_flops = peak_flops(torch.cuda.get_device_name(self.device), cfg.precision, cfg.peak_tflops)
        agent_config = AgentConfig(gamma=cfg.gamma, lr=cfg.agent_lr, eps_decay=cfg.eps_decay, eps_min=cfg.eps_min,
                                   reward_norm=cfg.reward_norm, target_sync=cfg.target_sync,
                                   switch_cost=cfg.switch_cost, moves=cfg.agent_moves,
                                   keep_margin=cfg.keep_margin)
        self.policy = build_policy(cfg.tie_policy, cfg.n_layer, seed=cfg.seed, agent_config=agent_config,
                                   reference=reference, static_state=cfg.static_state,
                                   total_steps=cfg.max_steps, tie_every=cfg.tie_every,
                                   grow_start=cfg.grow_start, grow_final=cfg.grow_final,
                                   grow_layout=cfg.grow_layout)
        self.controller = TieController(self.tying, self.policy, cfg.tie_every, cfg.reward,
                                        regroup=lambda plan: self.engine.regroup(plan),
                                        reward_loss=self._reward_loss, reward_delay=cfg.reward_delay,
                                        last_step=cfg.max_steps, sync=self.sync)
        # Reward batches come from their own generator so that the training data order is the
        # same for every policy with the same seed.
        self.reward_generator = torch.Generator().manual_seed(cfg.seed + 1 + _RANK_STREAM * rank)
        self.loader = self.data.train_loader(cfg.batch_size, cfg.seed, rank, world_size)
        self.step = 0
        self.stats = {"trainable_sum": 0.0, "independent_sum": 0.0, "tokens": 0, "train_time": 0.0,
                      "step_time": 0.0, "regroup_time": 0.0, "regroups": 0, "skipped_steps": 0,
                      "best_val_ppl": math.inf, "test_ppl_at_best_val": None, "val_accuracy_at_best_val": None}

        if checkpoint is None:
            self.controller.setup()
        else:
            self._restore_structure(checkpoint)
        self.speed = prepare_for_speed(self.model, self.tying, cfg, self.device)
        self.engine = build_engine(self.model, cfg, self.device, self.sync, observer)
        if checkpoint is not None:
            # A DeepSpeed engine loads its own slice of the optimizer state from the checkpoint directory.
            self.engine.load_state_dict({**checkpoint[1], "checkpoint_dir": self.resumed_from})
        self.is_main = rank == 0
        if self.is_main and checkpoint is not None:
            self.resume_record["metrics_rows_dropped"] = truncate_metrics(cfg.out_dir, self.step)
        self.logger = MetricsLogger(cfg.out_dir, enabled=self.is_main,
                                    resumed_step=self.step if checkpoint is not None else None)
        if self.is_main:
            os.makedirs(cfg.out_dir, exist_ok=True)
            write_json_atomic(os.path.join(cfg.out_dir, "config.json"), asdict(cfg))
            self._save_tokenizer()
            if checkpoint is not None:
                self.logger.log(self.resume_record, self.step)
        self.setup_s = time.perf_counter() - started

    def _save_tokenizer(self) -> None:
        """The run carries its tokenizer, or its image processor (``megatie export`` and ``eval`` read it)."""
        final = os.path.join(self.cfg.out_dir, "tokenizer" if self.objective.name != "image" else "image_processor")
        tmp = f"{final}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        self.objective.save(tmp)
        replace_dir(tmp, final)

    # ------------------------------------------------------------------ pieces of a step
    def _reward_loss(self) -> float:
        if self.cfg.reward == "loss-drop":
            # A difference of two losses: on the same batch, batch-to-batch noise cancels. Drawn from
            # its own seed, so a resumed run measures on the same batch.
            batch = self.data.random_batch("train", self.cfg.reward_batch_size,
                                           torch.Generator().manual_seed(self.cfg.seed + 2 + _RANK_STREAM * self.rank))
        else:
            batch = self.data.random_batch("train", self.cfg.reward_batch_size, self.reward_generator)
        was_training = self.model.training
        self.model.eval()
        loss = self.objective.evaluate(self.model, [batch], self.device)["loss"]
        self.model.train(was_training)
        return loss

    def evaluate(self, split: str = "valid") -> float:
        """Perplexity over the split (``--eval-batches`` batches at most), weighted by predictions."""
        return self.evaluate_metrics(split)["ppl"]

    def evaluate_metrics(self, split: str = "valid") -> dict:
        """Loss, perplexity and (masked LM, images) accuracy over the split."""
        self.model.eval()
        metrics = self.objective.evaluate(self.model, self.data.eval_batches(split, self.cfg.batch_size,
                                                                             self.cfg.eval_batches), self.device)
        self.model.train()
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def _open_checkpoint(self, spec: str, out_dir: str):
        """The checkpoint to resume from, verified; damaged newer ones (auto) are set aside, named."""
        path, skipped = choose_checkpoint(spec, out_dir, self.sync)
        if skipped and self.sync.is_main:
            set_aside_damaged(skipped, lambda line: print(line, file=sys.stderr, flush=True))
        self.sync.barrier()
        checkpoint = load_checkpoint(path)
        self.resumed_from = path
        self.resume_record = {"event": "resume", "step": int(checkpoint[2]["step"]), "checkpoint": os.path.abspath(path),
                              "skipped": [os.path.basename(p) for p, _ in skipped]}
        return checkpoint

    def _check_checkpoint_fits(self, checkpoint) -> None:
        step, cfg = self.resume_record["step"], self.cfg
        family = checkpoint[2]["settings"].get("model", "gpt2")  # runs from before families were named: GPT-2
        if family != cfg.model:
            raise CheckpointError(f"checkpoint was made with model={family!r}, this run has {cfg.model!r}; the model "
                                  f"and its tie structure cannot change on resume (use train_{family}.py)")
        check_engine(checkpoint[1], cfg, self.world_size)
        check_timeline(self.resumed_from, step, cfg.out_dir)
        check_max_steps(step, cfg.max_steps)

    def _trainer_state(self) -> dict:
        return {"step": self.step, "controller": self.controller.state_dict(), "loader": self.loader.state_dict(),
                # Collective: each rank draws reward batches from its own stream, so all are saved.
                "reward_generators": self.sync.gather(self.reward_generator.get_state()),
                "torch_rng": torch.get_rng_state(),
                "stats": {k: (None if v is None else float(v)) for k, v in self.stats.items()},
                "settings": asdict(self.cfg), "world_size": self.world_size}

    def save(self, name: str | None = None) -> str:
        """Every rank writes its part (DeepSpeed) or rank 0 writes all (torch); atomically either way."""
        self._check_finite_weights()
        root = os.path.join(self.cfg.out_dir, "checkpoints")
        path = self.engine.save_checkpoint(root, name or step_name(self.step), self.step, self._trainer_state())
        if name is None and self.is_main:
            prune_checkpoints(root, self.cfg.keep_checkpoints)
        return path

    def _restore_structure(self, checkpoint) -> None:
        tensors, _, state = checkpoint
        changed = check_settings(state["settings"], asdict(self.cfg), self.cfg.allow_changed)
        self.resume_record["overrides"] = changed
        if changed and self.sync.is_main:
            print("resuming with changed settings: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()),
                  file=sys.stderr, flush=True)
        self.controller.load_state_dict(state["controller"])
        load_model_tensors(self.model, tensors)
        self.step = int(state["step"])
        self.loader.load_state_dict(state["loader"])
        generators = state["reward_generators"]
        if len(generators) != self.world_size:
            raise CheckpointError(f"checkpoint was written by {len(generators)} rank(s), this run has "
                                  f"{self.world_size}; resume with the same number of ranks")
        self.reward_generator.set_state(generators[self.rank])
        torch.set_rng_state(state["torch_rng"])
        self.stats.update(state["stats"])

    # ------------------------------------------------------------------ the loop
    def next_inputs(self, micro: int = 0) -> dict:
        """The model's inputs for micro-batch ``micro`` of the coming step (masks and augmentation drawn
        from the step, so a resumed run makes the same ones)."""
        return self.objective.train_inputs(next(self.loader), self.step, micro, self.rank)

    def train(self, until: int | None = None) -> dict:
        """Train to ``max_steps`` (or stop early at step ``until``, as a preempted job would)."""
        cfg = self.cfg
        stop = min(cfg.max_steps, until) if until is not None else cfg.max_steps
        tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len * self.world_size
        monitor = MemoryMonitor(self.device).start()
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", disable=not (self.is_main and cfg.progress),
                   dynamic_ncols=True)
        trainable = count_parameters(self.model)[0]
        last_val = None
        try:
            while self.step < stop:
                raise_if_requested()
                batches = [self.next_inputs(micro) for micro in range(cfg.grad_accum)]
                t0 = time.perf_counter()
                loss = self.engine.train_step(batches)  # returns a float: the step has finished
                self._check_finite_loss(loss)
                self.stats["step_time"] += time.perf_counter() - t0
                self.step += 1
                self.stats["trainable_sum"] += trainable
                self.stats["independent_sum"] += num_independent(self.tying.state)
                decision = self.controller.maybe_decide(self.step)
                self.stats["train_time"] += time.perf_counter() - t0
                self.stats["tokens"] += tokens_per_step
                if decision is not None:
                    trainable = decision["trainable_params"]
                    if "regroup_seconds" in decision:
                        self.stats["regroup_time"] += decision["regroup_seconds"]
                        self.stats["regroups"] += 1
                    self.logger.log(decision, self.step, prefix="tying/")
                if self.step % cfg.log_every == 0 or self.step == stop:
                    self.logger.log({"event": "train", "step": self.step, "loss": loss, "lr": self.engine.lr,
                                     "trainable_params": trainable, "n_independent": self.tying.num_independent(),
                                     "tokens_per_second": self._tokens_per_second(), "mfu": self._mfu()},
                                    self.step, prefix="train/")
                if self.step % cfg.eval_every == 0 or self.step == stop:
                    last_val = self._evaluate_and_track()
                if cfg.save_checkpoints and (self.step % cfg.checkpoint_every == 0 or self.step == stop):
                    self.save()
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", indep=self.tying.num_independent(), **_shown(last_val),
                                **({} if self.peak_flops is None else {"mfu": f"{self._mfu():.1%}"}))
        finally:
            bar.close()
            memory = monitor.stop()
        summary = self._summary(memory, last_val if last_val is not None else self.evaluate_metrics("valid"))
        if self.is_main:
            write_json_atomic(os.path.join(cfg.out_dir, "summary.json"), summary)
        self.logger.close()
        return summary

    def _check_finite_loss(self, loss: float) -> None:
        """A non-finite loss ends the run, before anything diverged is saved - unless fp16's loss
        scaler caught it and skipped the step (then it lowers the scale and training goes on)."""
        if math.isfinite(loss):
            return
        if self.engine.step_skipped():
            self.stats["skipped_steps"] += 1
            return
        raise DivergedError(f"training diverged: the loss is {loss} at step {self.step + 1}; nothing after the last "
                            "checkpoint was saved. Lower --lr or raise --warmup-steps, then resume with "
                            "--resume auto --allow-changed lr,warmup_steps")

    def _check_finite_weights(self) -> None:
        bad = [n for n, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise DivergedError(f"training diverged: {bad[0]} holds non-finite values at step {self.step}; it was "
                                "not saved. Lower --lr or raise --warmup-steps, then resume with --resume auto "
                                "--allow-changed lr,warmup_steps")

    def _tokens_per_second(self) -> float:
        return self.stats["tokens"] / max(self.stats["train_time"], 1e-9)

    def _mfu(self) -> float | None:
        """Over the training time so far, regroups and reward measurements included."""
        return mfu(self.flops_per_token, self._tokens_per_second(), self.world_size, self.peak_flops)

    def _evaluate_and_track(self) -> dict:
        """Validation metrics; the best perplexity (the loss's scale, for every objective) keeps a checkpoint."""
        metrics = self.evaluate_metrics("valid")
        val = metrics["ppl"]
        row = {"event": "eval", "step": self.step, **{f"val_{k}": v for k, v in metrics.items()}}
        if val < self.stats["best_val_ppl"]:
            self.stats["best_val_ppl"] = val
            self.stats["val_accuracy_at_best_val"] = metrics.get("accuracy")
            if "test" in self.data.splits:
                self.stats["test_ppl_at_best_val"] = row["test_ppl"] = self.evaluate("test")
            if self.cfg.save_checkpoints:
                self.save("best")
        self.logger.log(row, self.step, prefix="eval/")
        return metrics

    def _regroup_over_step(self) -> float | None:
        """Mean regroup time over mean training-step time (None before any regroup)."""
        if not self.stats["regroups"] or not self.step:
            return None
        return (self.stats["regroup_time"] / self.stats["regroups"]) / max(self.stats["step_time"] / self.step, 1e-12)

    def _summary(self, memory: dict, final_val: dict) -> dict:
        """Collective: every rank calls it (memory is the most any rank used, checksums one per rank)."""
        steps = max(self.step, 1)
        trainable, total = count_parameters(self.model)
        ranks_memory = self.sync.gather({k: memory.get(k) for k in ("peak_bytes", "avg_bytes", "peak_reserved_bytes",
                                                                    "peak_sampled_bytes")})
        most = {k: max((m[k] for m in ranks_memory if m[k] is not None), default=None) for k in ranks_memory[0]}
        return {
            "objective": self.objective.name,
            "final_val_ppl": final_val["ppl"],
            "final_val_loss": final_val["loss"],
            # masked-token accuracy (masked LM) or top-1 accuracy (images); None for causal LMs
            "final_val_accuracy": final_val.get("accuracy"),
            "best_val_ppl": self.stats["best_val_ppl"],
            "val_accuracy_at_best_val": self.stats["val_accuracy_at_best_val"],
            "test_ppl_at_best_val": self.stats["test_ppl_at_best_val"],
            "mean_trainable_params": self.stats["trainable_sum"] / steps,
            "final_trainable_params": trainable,
            "total_params": total,
            "conventional_trainable_params": self.tying.untied_parameter_count(),
            "mean_independent_layers": self.stats["independent_sum"] / steps,
            "final_independent_layers": self.tying.num_independent(),
            "final_state": list(self.tying.state),
            "decisions": len(self.controller.history),
            "tokens_per_second": self._tokens_per_second(),
            "model_flops_per_token": self.flops_per_token,
            "mfu": self._mfu(),
            "peak_flops": self.peak_flops,
            "train_time_s": self.stats["train_time"],
            "setup_s": self.setup_s,
            "data_setup_s": self.data_setup_s,
            "peak_memory_bytes": most["peak_bytes"],
            "avg_memory_bytes": most["avg_bytes"],
            "peak_reserved_bytes": most["peak_reserved_bytes"],
            "peak_sampled_bytes": most["peak_sampled_bytes"],
            "memory_source": memory["source"],
            "peak_resets_folded": memory.get("resets_folded", 0),
            "optimizer_state_bytes": self.engine.optimizer_state_bytes(),
            "regroups": int(self.stats["regroups"]),
            "regroup_seconds_mean": (self.stats["regroup_time"] / self.stats["regroups"]
                                     if self.stats["regroups"] else None),
            "step_seconds_mean": self.stats["step_time"] / steps,
            "regroup_over_step": self._regroup_over_step(),
            "rank_param_checksums": self.sync.gather(param_checksum(unique_parameters(self.model))),
            "steps": self.step,
            "engine": "deepspeed" if self.cfg.uses_deepspeed else "torch",
            "precision": self.cfg.precision,
            **self.speed,
            "tie_policy": self.cfg.tie_policy,
            "tie_mode": self.cfg.tie_mode,
            "reward": self.cfg.reward,
            "n_layer": self.cfg.n_layer,
            "world_size": self.world_size,
        }


def _shown(metrics: dict | None) -> dict:
    """The progress bar's validation fields."""
    if metrics is None:
        return {"val_ppl": "-"}
    shown = {"val_ppl": f"{metrics['ppl']:.1f}"}
    if "accuracy" in metrics:
        shown["val_acc"] = f"{metrics['accuracy']:.1%}"
    return shown
