"""An export as any user of transformers sees it, with megatie kept out of the process:

    python benchmarks/plain_transformers.py EXPORT DOCUMENT [--masked] [--prompt TEXT] [--new-tokens N]

prints one JSON object: ``ids`` (``AutoTokenizer`` on the document as it is), ``model_max_length``, and
for a causal model ``ppl`` (``AutoModelForCausalLM`` over windows of the model's context, every token but
each window's first predicted, as ``megatie eval`` counts), ``generated`` (the text-generation pipeline's
greedy continuation of the prompt) and ``line_breaks`` (line breaks in a greedy continuation with the
line-break token made likely: a pipeline that stopped at the end of a line would give at most one).
``benchmarks/export_fidelity.py`` and ``tests/test_tokenization.py`` compare it with megatie's side.
"""

import argparse
import json
import math
import sys


def windowed_perplexity(model, ids: list[int], window: int) -> float:
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), window):
            w = torch.tensor([ids[start:start + window]])
            if w.shape[1] > 1:
                total += float(model(input_ids=w, labels=w).loss) * (w.shape[1] - 1)
                count += w.shape[1] - 1
    return math.exp(total / count)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("export")
    p.add_argument("document")
    p.add_argument("--masked", action="store_true", help="a masked LM: ids only, and the model loaded")
    p.add_argument("--prompt", default="The list")
    p.add_argument("--new-tokens", type=int, default=40)
    args = p.parse_args()
    sys.modules["megatie"] = None  # transformers alone: an import of megatie would fail here
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        AutoTokenizer,
        pipeline,
    )

    tokenizer = AutoTokenizer.from_pretrained(args.export)
    with open(args.document, encoding="utf-8") as f:
        ids = tokenizer(f.read(), add_special_tokens=False)["input_ids"]
    out = {"ids": ids, "tokens": len(ids), "model_max_length": tokenizer.model_max_length}
    if args.masked:
        AutoModelForMaskedLM.from_pretrained(args.export)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.export).eval()
        config = model.config
        out["ppl"] = windowed_perplexity(model, ids, int(getattr(config, "n_positions", None)
                                                          or config.max_position_embeddings))
        generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
        greedy = {"max_new_tokens": args.new_tokens, "do_sample": False, "return_full_text": False}
        out["generated"] = generator(args.prompt, **greedy)[0]["generated_text"]
        newline = tokenizer("\n", add_special_tokens=False)["input_ids"][-1]
        favoured = generator(args.prompt, sequence_bias={(newline,): 8.0}, **greedy)[0]["generated_text"]
        out["line_breaks"] = favoured.count("\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
