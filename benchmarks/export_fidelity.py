"""Does a run's export behave the same outside megatie? Perplexity and generation, megatie against plain
transformers, on one raw document.

    python benchmarks/export_fidelity.py --run runs/gpt2 --file examples/held_out.txt \
        --out benchmarks/results/export_fidelity.json

The run is exported (``hf``) into a temporary directory. megatie's side: ``megatie eval`` and ``megatie
generate`` on the run directory. Plain side: ``benchmarks/plain_transformers.py`` on the export, in a
process where megatie cannot be imported. Prints a table and writes JSON; leaves nothing behind but the
JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile


def megatie_side(run: str, document: str, prompt: str, new_tokens: int) -> dict:
    from megatie.tools.inference import generate, load_for_inference, perplexity

    model, tokenizer = load_for_inference(run)
    result = perplexity(model, tokenizer, document)
    text = generate(model, tokenizer, prompt, max_new_tokens=new_tokens, temperature=0)
    return {"ppl": result["ppl"], "tokens": result["tokens"], "generated": text,
            "tokenization": getattr(tokenizer, "tokenization", "lines")}


def plain_side(export: str, document: str, prompt: str, new_tokens: int) -> dict:
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plain_transformers.py")
    r = subprocess.run([sys.executable, script, export, document, "--prompt", prompt, "--new-tokens", str(new_tokens)],
                       capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"error: plain transformers failed on the export: {r.stderr.strip().splitlines()[-1]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a run directory of a causal family (gpt2, llama)")
    p.add_argument("--file", required=True, help="a raw text document")
    p.add_argument("--prompt", default="The list")
    p.add_argument("--new-tokens", type=int, default=40)
    p.add_argument("--out", help="JSON file to write")
    args = p.parse_args(argv)
    for path, what in ((args.run, "run directory"), (args.file, "document")):
        if not os.path.exists(path):
            print(f"error: {what} {path} not found", file=sys.stderr)
            return 2
    from megatie.tools.export import export_run

    ours = megatie_side(args.run, args.file, args.prompt, args.new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        export = export_run(args.run, os.path.join(tmp, "hf"))
        theirs = plain_side(export, args.file, args.prompt, args.new_tokens)
    theirs.pop("ids")
    result = {"run": args.run, "file": args.file, "prompt": args.prompt, "megatie": ours, "transformers": theirs,
              "ppl_ratio": theirs["ppl"] / ours["ppl"], "same_generation": theirs["generated"] == ours["generated"]}
    print(f"| tokenization `{ours['tokenization']}` | tokens | PPL | greedy continuation of {args.prompt!r} |")
    print("|---|---|---|---|")
    for name, side in (("megatie eval / generate (run)", ours), ("plain transformers (export)", theirs)):
        print(f"| {name} | {side['tokens']} | {side['ppl']:.2f} | {json.dumps(side['generated'][:60])} |")
    print(f"plain / megatie PPL: {result['ppl_ratio']:.4f}; same generation: {result['same_generation']}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
