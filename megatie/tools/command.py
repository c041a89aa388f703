"""``megatie`` (or ``python -m megatie``): take a trained model out of a run and use it.

    megatie export RUN_DIR OUT_DIR [--checkpoint best|final|NAME] [--format hf|compact]
    megatie eval (RUN_DIR|EXPORT_DIR) --file TEXT [--json OUT]
    megatie generate (RUN_DIR|EXPORT_DIR) --prompt "..." [--max-new-tokens N --temperature T --top-k K --top-p P]
    megatie finetune (RUN_DIR|EXPORT_DIR) OUT_DIR (--train-file F.csv|.tsv|.jsonl | --glue TASK) [--epochs N ...]

Training stays in ``launchers/``. Like the launchers, a mistake ends in one line and exit status 2,
and the parser imports no torch (``--help`` is instant).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from megatie.config import FinetuneConfig
from megatie.tools.train_cli import _Parser, run_main


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="megatie", description="Export, evaluate and sample models trained with megatie.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    export = sub.add_parser("export", help="write a run's model as a Hugging Face or compact directory")
    export.add_argument("run_dir")
    export.add_argument("out_dir", help="a new (or empty) directory")
    export.add_argument("--format", default="hf", choices=["hf", "compact"],
                        help="hf: standard transformers directory; compact: independent blocks + tie map")
    for name, command in (("eval", "perplexity on a text file"), ("generate", "sample a continuation")):
        s = sub.add_parser(name, help=command)
        s.add_argument("source", help="a run directory, or a directory written by megatie export")
        if name == "eval":
            s.add_argument("--file", required=True, help="text file (.txt, .jsonl with a text field, .gz)")
            s.add_argument("--json", help="also write the result to this JSON file")
            s.add_argument("--batch-size", type=int, default=8)
        else:
            s.add_argument("--prompt", required=True)
            s.add_argument("--max-new-tokens", type=int, default=50)
            s.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
            s.add_argument("--top-k", type=int)
            s.add_argument("--top-p", type=float)
            s.add_argument("--seed", type=int, default=0)
    _add_finetune(sub)
    for s in (export, *(sub.choices[n] for n in ("eval", "generate", "finetune"))):
        s.add_argument("--checkpoint", default="best", help="for a run directory: best, final or a checkpoint name")
    return p


def _add_finetune(sub) -> None:
    default = {name: f.default for name, f in FinetuneConfig.__dataclass_fields__.items()}  # defined once, there
    s = sub.add_parser("finetune", help="train sequence classification on labeled text, the tie map kept")
    s.add_argument("source", help="a run directory, or a directory written by megatie export")
    s.add_argument("out_dir", help="a new (or empty) directory for the fine-tuned model")
    data = s.add_mutually_exclusive_group(required=True)
    data.add_argument("--train-file", help="labeled examples: .csv/.tsv with a header, or .jsonl objects")
    data.add_argument("--glue", help="a GLUE task (sst2, cola, mrpc, ...): needs the Hugging Face hub or its cache")
    s.add_argument("--valid-file", help="held-out examples (default: --held-out of --train-file)")
    s.add_argument("--held-out", type=float, default=default["held_out"],
                   help="fraction of --train-file held out for accuracy")
    s.add_argument("--text-column", default=default["text_column"])
    s.add_argument("--label-column", default=default["label_column"], help="integer labels")
    s.add_argument("--epochs", type=int, default=default["epochs"])
    s.add_argument("--batch-size", type=int, default=default["batch_size"])
    s.add_argument("--lr", type=float, default=default["lr"])
    s.add_argument("--weight-decay", type=float, default=default["weight_decay"])
    s.add_argument("--max-length", type=int, help="tokens kept per text (default: the model's context)")
    s.add_argument("--seed", type=int, default=default["seed"])
    s.add_argument("--no-progress", dest="progress", action="store_false")


def _finetune_config(args):
    names = set(FinetuneConfig.__dataclass_fields__)
    return FinetuneConfig(**{k: v for k, v in vars(args).items() if k in names})


def _check_new_dir(path: str) -> None:
    from megatie.errors import ConfigError

    if os.path.islink(path):  # the result is renamed into place: a link would be replaced, or refuse it
        raise ConfigError(f"{path} is a symbolic link; name a new directory (or the directory it points to)")
    if os.path.exists(path) and not (os.path.isdir(path) and not os.listdir(path)):
        raise ConfigError(f"{path} exists and is not an empty directory; choose a new one")


def _validate(args) -> None:
    from megatie.errors import ConfigError

    if getattr(args, "max_new_tokens", 1) < 1:
        raise ConfigError("--max-new-tokens must be at least 1")
    if getattr(args, "batch_size", 1) < 1:
        raise ConfigError("--batch-size must be at least 1")
    if not 0 <= getattr(args, "temperature", 0.0) < float("inf"):  # nan fails too
        raise ConfigError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if getattr(args, "top_p", None) is not None and not 0 < args.top_p <= 1:
        raise ConfigError("--top-p must be in (0, 1]")
    if getattr(args, "top_k", None) is not None and args.top_k < 1:
        raise ConfigError("--top-k must be at least 1")
    json_out = getattr(args, "json", None)
    if json_out and (os.path.isdir(json_out) or not os.path.isdir(os.path.dirname(os.path.abspath(json_out)))):
        raise ConfigError(f"--json {json_out}: name a file in an existing directory")
    source = getattr(args, "source", None) or args.run_dir
    if not os.path.isdir(source):
        raise ConfigError(f"{source} is not a directory")
    if getattr(args, "file", None) is not None and not os.path.isfile(args.file):
        raise ConfigError(f"file not found: {args.file}")
    if getattr(args, "out_dir", None) is not None:
        _check_new_dir(args.out_dir)


def command_main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    _validate(args)
    if args.command == "export":
        from megatie.tools.export import export_run

        out = export_run(args.run_dir, args.out_dir, args.checkpoint, args.format)
        print(f"exported {args.run_dir} ({args.checkpoint}) as {args.format} to {out}")
        return
    if args.command == "finetune":
        _finetune(args)
        return
    from megatie.tools.inference import generate, load_for_inference, perplexity

    model, tokenizer = load_for_inference(args.source, args.checkpoint)
    if args.command == "eval":
        result = perplexity(model, tokenizer, args.file, args.batch_size)
        if args.json:
            from megatie.runtime.atomic import write_json_atomic

            write_json_atomic(args.json, result)
        print(json.dumps({k: result[k] for k in ("ppl", "loss", "tokens", "predicted_tokens")}))
    else:
        print(generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                       args.top_p, args.seed))


def _finetune(args) -> None:
    from megatie.data.labeled import check_classes, load_examples

    cfg = _finetune_config(args)
    cfg.validate()
    examples = load_examples(cfg)  # every labeled row checked before torch and the model load
    check_classes(*examples)
    from megatie.tools.finetune import finetune

    summary = finetune(cfg, examples)
    print(json.dumps({k: summary[k] for k in ("held_out_accuracy", "majority_baseline", "train_examples",
                                              "held_out_examples", "independent_blocks")}))
    print(f"fine-tuned model written to {os.path.abspath(cfg.out_dir)}")


def main() -> int:
    return run_main(command_main)


if __name__ == "__main__":
    sys.exit(main())
