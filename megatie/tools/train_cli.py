"""Command-line front end shared by the launchers: flags -> ``TrainConfig`` -> a run.

Errors the user can fix end with one line on stderr and exit status 2, never a traceback
(set ``MEGATIE_DEBUG=1`` to see the traceback anyway).

Importing this module and building the parser import no torch, transformers or DeepSpeed (the
choices come from ``megatie.presets`` and ``megatie.tying.options``), so ``--help`` and a mistyped flag
answer in well under a second; everything that can be checked without them is checked before they load.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback
from types import SimpleNamespace

from megatie.config import (
    DEFAULT_TIE_EVERY,
    FLAT,
    FREE,
    LR_SCHEDULES,
    TrainConfig,
)
from megatie.errors import MegatieError
from megatie.presets import PRESETS
from megatie.runtime.interrupts import ignore_interrupts, interrupts_end_the_run
from megatie.runtime.runlock import RunLock
from megatie.tools.preflight import (
    check_inputs,
    check_not_a_run_to_overwrite,
    check_out_dir,
    check_precision,
    check_something_left,
    remove_if_empty,
)
from megatie.tying import options

DISK_FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
INTERRUPTED = "interrupted; checkpoints already written are intact (resume from the newest with --resume auto)"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _name_list(text: str) -> list[str]:
    names = [x.strip().replace("-", "_") for x in text.split(",") if x.strip()]
    if not names:
        raise argparse.ArgumentTypeError("name at least one setting")
    return names


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Train a transformer from scratch with dynamic layer tying.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = SimpleNamespace(**TrainConfig().flat())  # every setting's default, by its flag's name
    run = p.add_argument_group("run")
    run.add_argument("--out-dir", default=d.out_dir,
                     help="run directory: metrics, checkpoints, summary (default runs/<family>, e.g. runs/gpt2)")
    run.add_argument("--preset", default=d.preset, choices=sorted(PRESETS), metavar="NAME",
                     help=f"model/run size: {', '.join(PRESETS)}")
    run.add_argument("--max-steps", type=int, help="optimizer steps (preset default)")
    run.add_argument("--seed", type=int, default=d.seed)
    run.add_argument("--resume", help="checkpoint directory, or 'auto' for the newest in --out-dir that verifies")
    run.add_argument("--threads", type=int,
                     help="CPU threads per process (default: the usable cores divided among this node's ranks; "
                          "OMP_NUM_THREADS, when set, is kept)")
    run.add_argument("--allow-changed", type=_name_list, default=[], metavar="SETTING[,SETTING]",
                     help="on resume, accept these settings differing from the checkpoint's (e.g. max_steps,lr); "
                          "other changes are refused")
    model = p.add_argument_group("model (overrides the preset)")
    for flag in ("n-layer", "n-embd", "n-head", "seq-len"):
        model.add_argument(f"--{flag}", type=int)
    model.add_argument("--dropout", type=float, default=d.dropout)
    opt = p.add_argument_group("optimisation (the one source of truth for batch size and lr)")
    opt.add_argument("--batch-size", type=int, help="micro-batch per rank")
    opt.add_argument("--grad-accum", type=int, default=d.grad_accum, help="gradient accumulation steps")
    opt.add_argument("--lr", type=float)
    opt.add_argument("--lr-schedule", default=d.lr_schedule, choices=LR_SCHEDULES)
    opt.add_argument("--warmup-steps", type=int)
    opt.add_argument("--weight-decay", type=float, default=d.weight_decay)
    opt.add_argument("--grad-clip", type=float, default=d.grad_clip)
    opt.add_argument("--adam-beta1", type=float, default=d.adam_beta1)
    opt.add_argument("--adam-beta2", type=float, default=d.adam_beta2)
    opt.add_argument("--adam-eps", type=float, default=d.adam_eps)
    tie = p.add_argument_group("tying")
    tie.add_argument("--tie-policy", default=d.tie_policy, metavar="NAME",
                     help="; ".join(f"{k}: {v.help}" for k, v in options.POLICIES.items()))
    tie.add_argument("--tie-every", type=int, default=d.tie_every, help=f"steps between decisions (k; default {DEFAULT_TIE_EVERY})")
    tie.add_argument("--tie-mode", default=d.tie_mode, metavar="MODE", help=f"one of {', '.join(options.TIE_MODES)}")
    tie.add_argument("--reward", default=d.reward, metavar="NAME", help=f"one of {', '.join(options.REWARDS)}")
    tie.add_argument("--reward-batch-size", type=int, help="batch for the reward (default: --batch-size)")
    tie.add_argument("--reference-run", help="finished qlearning run for static/replay/vanilla ablations")
    tie.add_argument("--static-state", type=_int_list, help="tie map for --tie-policy static, e.g. 0,0,2,2")
    tie.add_argument("--vanilla-layers", type=int, help="block count for --tie-policy vanilla")
    tie.add_argument("--agent-lr", type=float, default=d.agent_lr)
    tie.add_argument("--gamma", type=float, default=d.gamma)
    tie.add_argument("--eps-decay", type=float, default=d.eps_decay)
    tie.add_argument("--eps-min", type=float, default=d.eps_min)
    tie.add_argument("--reward-norm", default=d.reward_norm, choices=options.REWARD_NORMS,
                     help="standardise rewards with a running mean/std before the TD update")
    tie.add_argument("--target-sync", type=int, default=d.target_sync,
                     help="bootstrap from a target Q-network refreshed every N updates (0: none)")
    tie.add_argument("--switch-cost", type=float, default=d.switch_cost,
                     help="reward penalty per block whose tie changed")
    tie.add_argument("--agent-moves", default=d.agent_moves, choices=options.MOVES,
                     help="'vector': a whole new action each decision (the paper); 'local': change at most "
                          "one block's entry per decision")
    tie.add_argument("--keep-margin", type=float, default=d.keep_margin,
                     help="local moves: keep the structure unless a block's Q gain exceeds this")
    tie.add_argument("--reward-delay", action="store_true",
                     help="reward each action with the loss measured at the next decision")
    tie.add_argument("--grow-start", type=float, default=d.grow_start,
                     help="grow: fraction of training with every block tied to block 0")
    tie.add_argument("--grow-final", type=int, help="grow: groups at the end (default 4)")
    tie.add_argument("--grow-layout", default=d.grow_layout, choices=options.GROW_LAYOUTS,
                     help="grow: contiguous chunks (1, 2, ..., final groups) or block i -> i mod g "
                          "(g along a divisor chain such as 1, 2, 4, 12)")
    tie.add_argument("--param-budget", type=float,
                     help="split: trainable parameters never above this fraction of conventional's (default: 1/3, "
                          "and at least two independent blocks where a third cannot pay for them)")
    tie.add_argument("--tie-relax", default=d.tie_relax, metavar="KINDS",
                     help="what a tied position keeps of its own: none, norms (norm parameters and biases), "
                          "lora:R (a rank-R delta on each tied weight matrix), lora:auto (split: the rank the "
                          "parameter budget pays for after whole blocks, which keeps the budget exactly), or "
                          "norms with either")
    tie.add_argument("--tie-parts", default=d.tie_parts, choices=options.TIE_PARTS,
                     help="which part of a block is tied: all, attention only, or the MLP only")
    tie.add_argument("--tie-keep-unique", default=d.tie_keep_unique, choices=options.KEEP_UNIQUE,
                     help="blocks kept out of tying: the first, the last or both (middle-cycle sharing)")
    data = p.add_argument_group("data")
    data.add_argument("--train-file", dest="train_files", action="append", default=[],
                      help="text file or glob (.txt, .jsonl, .gz); repeatable")
    data.add_argument("--valid-file", dest="valid_files", action="append", default=[],
                      help="validation text (default: the end of the training text)")
    data.add_argument("--dataset", help="wikitext-2, wikitext-103, lambada or lm1b (needs the HF cache); "
                                        "train_vit.py: digits or a Hugging Face image dataset name")
    data.add_argument("--dataset-dir", help="with --dataset lm1b: the extracted One Billion Word release directory")
    data.add_argument("--data-dir", help="a directory made by launchers/prepare_data.py")
    data.add_argument("--tokenizer", default=d.tokenizer, help="sentencepiece, gpt2, or a local tokenizer path")
    data.add_argument("--vocab-size", type=int, help="SentencePiece vocabulary size")
    data.add_argument("--pad-vocab-to", type=int, metavar="N",
                      help="pad the model's embedding and LM head to a multiple of N rows (default 128; 1: none); "
                           "the padded ids are masked and cut off on export")
    data.add_argument("--mask-prob", type=float, default=d.mask_prob,
                      help="masked LM (train_bert.py): share of tokens chosen (80%% [MASK], 10%% random, 10%% kept)")
    images = p.add_argument_group("images (train_vit.py; default: the handwritten digits scikit-learn ships)")
    images.add_argument("--image-dir", help="a directory with one sub-directory of images per class")
    images.add_argument("--image-size", type=int, help="side images are resized to (default: their own, 32 for "
                                                       "folders and datasets)")
    images.add_argument("--patch-size", type=int, help="ViT patch side (default: image size / 4)")
    data.add_argument("--cache-dir", default=d.cache_dir)
    log = p.add_argument_group("logging")
    log.add_argument("--log-every", type=int, default=d.log_every)
    log.add_argument("--eval-every", type=int)
    log.add_argument("--eval-batches", type=int, default=d.eval_batches, help="cap on validation batches")
    log.add_argument("--checkpoint-every", type=int)
    log.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    log.add_argument("--no-checkpoints", dest="save_checkpoints", action="store_false",
                     help="write no step or best checkpoints (benchmarks, throwaway runs)")
    log.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    log.add_argument("--peak-tflops", type=float,
                     help="the GPU's dense peak TFLOPS at the run's precision, for MFU (default: looked up "
                          "from the device name: A100, H100, H200)")
    ds = p.add_argument_group("DeepSpeed (engine settings only; batch, lr and clipping come from the flags above)")
    ds.add_argument("--deepspeed", metavar="CONFIG",
                    help="train with DeepSpeed ZeRO (stage 0-2) using this JSON config, e.g. ds_configs/zero2.json")
    ds.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                    help="set by the deepspeed launcher")
    ds.add_argument("--activation-checkpointing", action="store_true",
                    help="recompute block activations in backward (non-reentrant; works with tied blocks)")
    ds.add_argument("--dist-timeout-s", type=int, default=d.dist_timeout_s,
                    help="a collective that waits longer than this ends the run with an error")
    speed = p.add_argument_group("speed (GPU)")
    speed.add_argument("--no-tf32", dest="tf32", action="store_false",
                       help="keep fp32 matmuls in full fp32 on CUDA (by default fp32 runs use TF32 tensor cores)")
    speed.add_argument("--compile", action="store_true",
                       help="torch.compile each transformer block (compiles once; regroups compile nothing)")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig.from_flat({k: v for k, v in vars(args).items() if k in FLAT})


def given_flags(argv) -> set[str]:
    """The settings the command line names explicitly (every default suppressed)."""
    parser = build_parser()
    for action in parser._actions:  # argparse keeps no record of which values were defaults
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def resume_config(cfg: TrainConfig, given: set[str]) -> TrainConfig:
    """For a resumed run, the settings not given on the command line are unset (None), so that the
    trainer takes them from the checkpoint: ``--resume auto`` alone continues the run as it was."""
    # The model family is the launcher's, never taken from the checkpoint: a mismatch is refused.
    values = {k: (v if k in given or k in FREE or k == "model" else None) for k, v in cfg.flat().items()}
    return TrainConfig.from_flat(values)


def run_main(main_fn, argv=None) -> int:
    """Call ``main_fn(argv)``; turn user errors into one line and exit status 2, and an interrupt
    (Ctrl-C, or SIGTERM from a launcher) into the resume hint and exit status 130."""
    with interrupts_end_the_run():
        try:
            main_fn(argv)
            return 0
        except MegatieError as e:
            if os.environ.get("MEGATIE_DEBUG"):
                traceback.print_exc()
            if not getattr(e, "rank_zero_only", False) or os.environ.get("RANK", "0") == "0":
                print(f"error: {e}", file=sys.stderr)
            return 2
        except OSError as e:
            if e.errno not in DISK_FULL:
                raise
            print(f"error: {e.strerror} writing {e.filename or 'a file'}; free space (or raise the quota or "
                  "file-size limit) and run again - what was written before is intact", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            ignore_interrupts()
            print(INTERRUPTED, file=sys.stderr)
            return 130


def exit_process(code: int) -> None:
    """End the process with ``code``. A rank started by a distributed launcher ends without the
    interpreter's finalisation: after a finished run, torch.distributed's C++ worker threads being torn
    down under a finalising interpreter can abort the process (SIGABRT), turning success into a failed
    job. Everything megatie writes is closed and flushed before this point."""
    sys.stdout.flush()
    sys.stderr.flush()
    if "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ:
        os._exit(code)
    sys.exit(code)


def train_main(argv=None, model: str = "gpt2") -> dict:
    """Train a model of family ``model`` (the launcher's: train_gpt2.py, train_llama.py, train_bert.py,
    train_vit.py) with ``argv``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = config_from_args(build_parser().parse_args(argv)).replace(model=model)
    # Resolved and validated (a bad DeepSpeed config included) before any process group exists. A fresh
    # run trains with exactly this config; a resumed one first takes what was left unset from its
    # checkpoint (the trainer resolves that once), so here its flags are only checked.
    resolved = cfg.resolved()
    given = given_flags(argv)
    # Everything checkable is checked before the run directory is made: a refused run leaves nothing.
    check_inputs(resolved)
    check_something_left(resolved, given)
    if resolved.uses_deepspeed:
        check_precision(resolved)
    made = check_out_dir(resolved.run.out_dir)
    # One run per out-dir, held by the (global) rank 0 process, taken before the heavy imports so
    # that a second run is refused at once.
    lock = RunLock(resolved.run.out_dir).acquire() if os.environ.get("RANK", "0") == "0" else None
    try:
        check_not_a_run_to_overwrite(resolved)  # under the lock: a live run there is named by its pid first
        summary = _train(resume_config(cfg, given) if cfg.run.resume else resolved)
    except MegatieError:
        if lock is not None:
            lock.release()
            lock = None
            remove_if_empty(made)  # a run that failed on its data or its checkpoint leaves no empty directories
        raise
    finally:
        if lock is not None:
            lock.release()
    if summary.get("world_size", 1) > 1 and os.environ.get("RANK", "0") != "0":
        return summary
    print(summary_line(summary, model))
    out_dir = resolved.run.out_dir
    print(f"results in {out_dir}: summary.json, metrics.jsonl, tensorboard/ (tensorboard --logdir {out_dir}), "
          f"checkpoints/; a standard model: megatie export {out_dir} DIR")
    return summary


def summary_line(summary: dict, model: str) -> str:
    """The run's result in the family's own terms: an image classifier's accuracy, not a perplexity."""
    from megatie.models import get_spec

    quality = {"image": ("final_val_accuracy", "val_accuracy_at_best_val"),
               "masked": ("final_val_ppl", "best_val_ppl", "final_val_accuracy")}.get(
        get_spec(model).objective, ("final_val_ppl", "best_val_ppl"))
    keys = ("steps", *(k for k in quality if summary.get(k) is not None), "mean_independent_layers",
            "final_trainable_params", "tokens_per_second")
    return " ".join(f"{k}={summary[k]:.4g}" if isinstance(summary[k], float) else f"{k}={summary[k]}" for k in keys)


def _train(cfg: TrainConfig) -> dict:
    from megatie.trainer import (
        Trainer,  # torch and transformers: only once the flags are known to be good
    )

    if not cfg.engine.deepspeed:
        return Trainer(cfg).train()
    from megatie.runtime.distributed import (
        failures_as_errors,
        init_deepspeed_distributed,
        shutdown_distributed,
    )

    sync = init_deepspeed_distributed(cfg.engine.local_rank, cfg.engine.dist_timeout_s)
    try:
        with failures_as_errors(sync, cfg.engine.dist_timeout_s):
            return Trainer(cfg, sync=sync).train()
    finally:
        shutdown_distributed()
