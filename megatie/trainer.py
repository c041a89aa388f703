"""The training loop: data, model, tying controller, an optimisation engine, logs, checkpoints.

Read top to bottom: ``Trainer.__init__`` builds everything (resuming if asked), ``train()`` runs
the schedule and writes ``summary.json``. The optimisation itself lives in an *engine* built by
``megatie.engines.build_engine``: plain torch in one process (the reference) or DeepSpeed ZeRO on
any number of ranks, both implementing ``megatie.engines.protocol.Engine``. Ranks agree through
``megatie.runtime.distributed.RankSync``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
import time

import torch
from tqdm.auto import tqdm

from megatie.checkpoint.resume import (
    check_checkpoint_fits,
    open_checkpoint,
    truncate_metrics,
)
from megatie.checkpoint.store import load_model_tensors, prune_checkpoints, step_name
from megatie.config import (
    RunFacts,
    TrainConfig,
    adopt_unset,
    check_settings,
    config_record,
    recorded_settings,
)
from megatie.data.prefetch import StepPrefetcher
from megatie.engines import build_engine, check_checkpoint_engine, whole_weights
from megatie.engines.speed import prepare_for_speed
from megatie.errors import CheckpointError, DivergedError
from megatie.metrics.flops import mfu, model_flops_per_token, peak_flops
from megatie.metrics.logger import MetricsLogger
from megatie.metrics.memory import MemoryMonitor
from megatie.metrics.step_losses import PendingLosses
from megatie.metrics.summary import run_summary
from megatie.models import get_spec
from megatie.models.objectives import model_inputs_on, objective_for
from megatie.models.vocab import build_lm
from megatie.runtime.atomic import replace_dir, write_json_atomic
from megatie.runtime.distributed import RankSync
from megatie.runtime.interrupts import raise_if_requested
from megatie.runtime.threads import apply_threads
from megatie.tying.controller import TieController
from megatie.tying.gradient_probe import block_gradient_gram
from megatie.tying.layers import count_parameters, local_part, tying_for
from megatie.tying.options import POLICIES
from megatie.tying.policies import resolve_auto_rank, roots_within_budget
from megatie.tying.registry import build_policy, load_reference_run, policy_depth
from megatie.tying.tie_map import num_independent

# Each rank draws its reward batches from its own stream (rank 0's is the single-process one).
_RANK_STREAM = 7919


class Trainer:
    """Built in the order a run needs its parts: ranks; the checkpoint to resume (read first, so a bad
    one fails before anything expensive, and so settings left unset continue as it had them); the
    config, resolved once; the data and what it decides; the model and its ties; the policy and the
    controller; the starting structure (the policy's, or the checkpoint's); the engine over the
    trainable tensors that structure leaves; the run directory."""

    def __init__(self, cfg: TrainConfig, sync: RankSync | None = None, device: torch.device | None = None,
                 observer=None):
        started = time.perf_counter()
        self.sync = sync or RankSync()
        self.rank, self.world_size = self.sync.rank, self.sync.world_size
        self.is_main = self.rank == 0
        self.device = device or self.sync.device
        checkpoint = self._open_checkpoint(cfg) if cfg.run.resume else None
        self.cfg = cfg = self._resolve(cfg, checkpoint)
        self.threads = apply_threads(cfg.run.threads)
        torch.manual_seed(cfg.run.seed)
        reference = load_reference_run(cfg.tying.reference_run) if cfg.tying.reference_run else None
        self._build_data(reference)
        self.data_setup_s = time.perf_counter() - started   # must not grow with the corpus (no full scan)
        self._build_model()
        self._build_tying(reference)
        self._start_structure(checkpoint)
        self.speed = prepare_for_speed(self.model, self.tying, cfg, self.device, self.facts.vocab_size)
        self.engine = build_engine(self.model, cfg, self.device, self.sync, observer)
        self.controller.bind_regroup(lambda plan: self.engine.regroup(plan))  # whichever engine the trainer holds
        self.tying.partitioned = getattr(self.engine, "partitioned_tensors", None)  # ZeRO-3
        if checkpoint is not None:
            # A DeepSpeed engine loads its own slice of the optimizer state from the checkpoint directory.
            self.engine.load_state_dict({**checkpoint.optimizer_state, "checkpoint_dir": checkpoint.path})
        self._open_run_directory(checkpoint)
        self.setup_s = time.perf_counter() - started

    # ------------------------------------------------------------------ set-up, in order
    def _open_checkpoint(self, cfg: TrainConfig):
        checkpoint, skipped = open_checkpoint(cfg.run.resume, cfg.run.out_dir, self.sync)
        self.resume_record = {"event": "resume", "step": checkpoint.step,
                              "checkpoint": os.path.abspath(checkpoint.path), "skipped": skipped}
        return checkpoint

    def _resolve(self, cfg: TrainConfig, checkpoint) -> TrainConfig:
        """The config this run trains with, resolved once: a resumed run first takes every setting left
        unset from its checkpoint; an already resolved config (the launcher's) is kept as it is."""
        if checkpoint is not None:
            cfg = adopt_unset(cfg, checkpoint.settings)
        if not cfg.is_resolved or checkpoint is not None:
            cfg = cfg.resolved()
        if checkpoint is not None:
            check_checkpoint_fits(checkpoint, cfg)
            check_checkpoint_engine(checkpoint.optimizer_state, cfg, self.world_size)
        return cfg

    def _build_data(self, reference) -> None:
        """The objective reads the data; what it decides (vocabulary, classes, image shape) and the blocks
        the policy trains are the run's facts, recorded beside the config."""
        cfg = self.cfg
        self.spec = get_spec(cfg.model.family)
        self.objective = objective_for(self.spec, cfg)
        self.data = self.objective.build_data(self.rank, self.world_size, self.sync.barrier)
        depth = policy_depth(cfg.tying.tie_policy, cfg.tying.vanilla_layers, reference)
        self.facts = RunFacts(n_layer=depth or cfg.model.n_layer, **self.objective.learnt())
        self.settings = recorded_settings(cfg, self.facts)
        # Reward batches come from their own generator so that the training data order is the
        # same for every policy with the same seed.
        self.reward_generator = torch.Generator().manual_seed(cfg.run.seed + 1 + _RANK_STREAM * self.rank)
        self.loader = self.data.train_loader(cfg.optim.batch_size, cfg.run.seed, self.rank, self.world_size)

    def _build_model(self) -> None:
        cfg, facts = self.cfg, self.facts
        self.model = build_lm(self.spec, self.settings, seed=cfg.run.seed, device=self.device,
                              pad_to=cfg.model.pad_vocab_to)
        self.tying = tying_for(self.model, self.spec.block_path, self.settings)
        self.budget_roots = self._resolve_delta_rank() if self.tying.relax.auto else None
        self.flops_per_token = model_flops_per_token(self.model, self.tying.untied_parameter_count(),
                                                     facts.n_layer, cfg.model.n_embd, facts.seq_len)
        self.peak_flops = None  # no MFU on a CPU
        if self.device.type == "cuda":
            self.peak_flops = peak_flops(torch.cuda.get_device_name(self.device), cfg.engine.precision,
                                         cfg.engine.peak_tflops)

    def _build_tying(self, reference) -> None:
        cfg = self.cfg
        tying = cfg.tying
        self.policy = build_policy(tying.tie_policy, self.tying.num_blocks, seed=cfg.run.seed, agent_config=cfg.agent,
                                   reference=reference, static_state=tying.static_state,
                                   total_steps=cfg.run.max_steps, tie_every=tying.tie_every,
                                   grow_start=tying.grow_start, grow_final=tying.grow_final,
                                   grow_layout=tying.grow_layout, max_roots=self._roots_within_budget())
        self.controller = TieController(self.tying, self.policy, tying.tie_every, tying.reward,
                                        reward_loss=self._reward_loss, reward_delay=tying.reward_delay,
                                        last_step=cfg.run.max_steps, sync=self.sync,
                                        gradient_gram=self._gradient_gram)

    def _start_structure(self, checkpoint) -> None:
        """The policy's starting structure, or the checkpoint's with its weights, data position and streams."""
        self.step = 0
        self.pending_losses = PendingLosses()
        self.stats = {"trainable_sum": 0.0, "independent_sum": 0.0, "tokens": 0, "train_time": 0.0,
                      "step_time": 0.0, "regroup_time": 0.0, "regroups": 0, "skipped_steps": 0,
                      "best_val_ppl": math.inf, "test_ppl_at_best_val": None, "val_accuracy_at_best_val": None}
        if checkpoint is None:
            self.controller.setup()
        else:
            self._restore_structure(checkpoint)

    def _open_run_directory(self, checkpoint) -> None:
        out_dir = self.cfg.run.out_dir
        if self.is_main and checkpoint is not None:
            self.resume_record["metrics_rows_dropped"] = truncate_metrics(out_dir, self.step)
        self.logger = MetricsLogger(out_dir, enabled=self.is_main,
                                    resumed_step=self.step if checkpoint is not None else None)
        if self.is_main:
            os.makedirs(out_dir, exist_ok=True)
            write_json_atomic(os.path.join(out_dir, "config.json"), config_record(self.cfg, self.facts))
            self._save_tokenizer()
            if checkpoint is not None:
                self.logger.log(self.resume_record, self.step)

    def _save_tokenizer(self) -> None:
        """The run carries its tokenizer, or its image processor (``megatie export`` and ``eval`` read it)."""
        final = os.path.join(self.cfg.run.out_dir, "tokenizer" if self.objective.name != "image" else "image_processor")
        tmp = f"{final}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        self.objective.save(tmp)
        replace_dir(tmp, final)

    # ------------------------------------------------------------------ pieces of a step
    def _reward_loss(self) -> float:
        if self.cfg.tying.reward == "loss-drop":
            # A difference of two losses: on the same batch, batch-to-batch noise cancels. Drawn from
            # its own seed, so a resumed run measures on the same batch.
            batch = self.data.random_batch("train", self.cfg.tying.reward_batch_size,
                                           torch.Generator().manual_seed(self.cfg.run.seed + 2
                                                                         + _RANK_STREAM * self.rank))
        else:
            batch = self.data.random_batch("train", self.cfg.tying.reward_batch_size, self.reward_generator)
        was_training = self.model.training
        self.model.eval()
        loss = self.objective.evaluate(self.model, [batch], self.device)["loss"]
        self.model.train(was_training)
        return loss

    def _gradient_gram(self):
        """Each block's gradient on a probe batch (drawn like the reward's), compared pairwise."""
        raw = self.data.random_batch("train", self.cfg.tying.reward_batch_size, self.reward_generator)
        inputs = model_inputs_on(self.objective.train_inputs(raw, self.step, 0, self.rank), self.model, self.device)
        with whole_weights(self.engine):
            return block_gradient_gram(self.model, self.tying, inputs)

    def _resolve_delta_rank(self) -> int:
        """``lora:auto``: the roots and delta rank the budget pays for; the rank is a fact of the run
        (``lora:R`` in config.json and the checkpoints), the roots go to ``split``."""
        roots = resolve_auto_rank(self.tying, self.cfg.tying.param_budget)
        self.facts = dataclasses.replace(self.facts, tie_relax=str(self.tying.relax))
        self.settings = recorded_settings(self.cfg, self.facts)
        return roots

    def _roots_within_budget(self) -> int | None:
        if not POLICIES[self.cfg.tying.tie_policy].takes_budget:
            return None
        if self.budget_roots is not None:
            return self.budget_roots
        tying = self.tying
        return roots_within_budget(self.cfg.tying.param_budget, tying.untied_parameter_count(), tying.block_numel(),
                                   tying.num_blocks, tying.member_numel())

    def evaluate(self, split: str = "valid") -> float:
        """Perplexity over the split (``--eval-batches`` batches at most), weighted by predictions."""
        return self.evaluate_metrics(split)["ppl"]

    def evaluate_metrics(self, split: str = "valid") -> dict:
        """Loss, perplexity and (masked LM, images) accuracy over the split."""
        self.model.eval()
        metrics = self.objective.evaluate(self.model, self.data.eval_batches(split, self.cfg.optim.batch_size,
                                                                             self.cfg.run.eval_batches), self.device)
        self.model.train()
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def _trainer_state(self) -> dict:
        return {"step": self.step, "controller": self.controller.state_dict(), "loader": self.loader.state_dict(),
                # Collective: each rank draws reward batches from its own stream, so all are saved.
                "reward_generators": self.sync.gather(self.reward_generator.get_state()),
                "torch_rng": torch.get_rng_state(),
                "stats": {k: (None if v is None else float(v)) for k, v in self.stats.items()},
                "settings": self.settings, "world_size": self.world_size}

    def save(self, name: str | None = None) -> str:
        """Every rank writes its part (DeepSpeed) or rank 0 writes all (torch); atomically either way."""
        if len(self.pending_losses):
            self.read_losses()
        self._check_finite_weights()
        root = os.path.join(self.cfg.run.out_dir, "checkpoints")
        path = self.engine.save_checkpoint(root, name or step_name(self.step), self.step, self._trainer_state())
        if name is None and self.is_main:
            prune_checkpoints(root, self.cfg.run.keep_checkpoints)
        return path

    def _restore_structure(self, checkpoint) -> None:
        tensors, state = checkpoint.tensors, checkpoint.trainer_state
        changed = check_settings(checkpoint.settings, self.settings, self.cfg.run.allow_changed)
        self.resume_record["overrides"] = changed
        if changed and self.sync.is_main:
            print("resuming with changed settings: "
                  + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()),
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
        stop = min(cfg.run.max_steps, until) if until is not None else cfg.run.max_steps
        tokens_per_step = cfg.optim.batch_size * cfg.optim.grad_accum * self.facts.seq_len * self.world_size
        monitor = MemoryMonitor(self.device).start()
        bar = tqdm(total=cfg.run.max_steps, initial=self.step, desc="train",
                   disable=not (self.is_main and cfg.run.progress),
                   dynamic_ncols=True)
        # Step k+1's inputs are made (and pinned, for a GPU) on a worker thread while step k trains.
        prefetcher = StepPrefetcher(self.loader, lambda raw, step, micro: self.objective.train_inputs(
            raw, step, micro, self.rank), cfg.optim.grad_accum, pin=self.device.type == "cuda")
        trainable = count_parameters(self.model)[0]
        last_val = None
        try:
            while self.step < stop:
                raise_if_requested()
                batches = prefetcher.take(self.step, read_ahead=self.step + 1 < stop)
                t0 = time.perf_counter()
                # The loss stays on the device: reading it would make the host wait for the step.
                self.pending_losses.add(self.step + 1, self.engine.train_step(batches), self.engine.step_skipped())
                self.step += 1
                logs = self.step % cfg.run.log_every == 0 or self.step == stop
                evaluates = self.step % cfg.run.eval_every == 0 or self.step == stop
                saves = cfg.run.save_checkpoints and (self.step % cfg.run.checkpoint_every == 0 or self.step == stop)
                if logs or evaluates or saves or self.controller.is_decision_step(self.step):
                    loss = self.read_losses()  # waits for the step: the times below include it
                self.stats["step_time"] += time.perf_counter() - t0
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
                        self.stats["regroup_transient_max"] = max(self.stats.get("regroup_transient_max", 0),
                                                                  decision["regroup_transient_bytes"])
                    self.logger.log(decision, self.step, prefix="tying/")
                if logs:
                    self.logger.log({"event": "train", "step": self.step, "loss": loss, "lr": self.engine.lr,
                                     "trainable_params": trainable, "n_independent": self.tying.num_independent(),
                                     "tokens_per_second": self.tokens_per_second(), "mfu": self.mfu()},
                                    self.step, prefix="train/")
                if evaluates:
                    last_val = self._evaluate_and_track()
                if saves:
                    self.save()
                bar.update(1)
                if logs:
                    bar.set_postfix(loss=f"{loss:.3f}", indep=self.tying.num_independent(), **_shown(last_val),
                                    **({} if self.peak_flops is None else {"mfu": f"{self.mfu():.1%}"}))
        finally:
            prefetcher.close()
            bar.close()
            memory = monitor.stop()
        summary = run_summary(self, memory, last_val if last_val is not None else self.evaluate_metrics("valid"))
        if self.is_main:
            write_json_atomic(os.path.join(cfg.run.out_dir, "summary.json"), summary)
        self.logger.close()
        return summary

    def read_losses(self) -> float:
        """The parked training losses, read in one transfer; the newest is returned. A non-finite one ends
        the run before anything diverged is saved - unless fp16's loss scaler caught it and skipped the
        step (then it lowers the scale and training goes on)."""
        losses = self.pending_losses.read()
        self.stats["skipped_steps"] += sum(1 for x in losses if x.skipped and not math.isfinite(x.value))
        bad = PendingLosses.first_diverged(losses)
        if bad is not None:
            raise DivergedError(f"training diverged: the loss is {bad.value} at step {bad.step}; nothing after the "
                                "last checkpoint was saved. Lower --lr or raise --warmup-steps, then resume with "
                                "--resume auto --allow-changed lr,warmup_steps")
        return losses[-1].value

    def _check_finite_weights(self) -> None:
        bad = [n for n, p in self.model.named_parameters() if not bool(torch.isfinite(local_part(p)).all())]
        if bad:
            raise DivergedError(f"training diverged: {bad[0]} holds non-finite values at step {self.step}; it was "
                                "not saved. Lower --lr or raise --warmup-steps, then resume with --resume auto "
                                "--allow-changed lr,warmup_steps")

    def tokens_per_second(self) -> float:
        return self.stats["tokens"] / max(self.stats["train_time"], 1e-9)

    def mfu(self) -> float | None:
        """Over the training time so far, regroups and reward measurements included."""
        return mfu(self.flops_per_token, self.tokens_per_second(), self.world_size, self.peak_flops)

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
            if self.cfg.run.save_checkpoints:
                self.save("best")
        self.logger.log(row, self.step, prefix="eval/")
        return metrics


def _shown(metrics: dict | None) -> dict:
    """The progress bar's validation fields."""
    if metrics is None:
        return {"val_ppl": "-"}
    shown = {"val_ppl": f"{metrics['ppl']:.1f}"}
    if "accuracy" in metrics:
        shown["val_acc"] = f"{metrics['accuracy']:.1%}"
    return shown
