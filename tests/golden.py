"""Golden losses: the per-step training losses of a short run of every family on every engine, pinned.

A restructuring of the package must not change what a run computes. Each golden run goes through a
launcher exactly as a user starts it (a subprocess; two for two ranks, started the way DeepSpeed's
launcher starts them), on a corpus this module writes itself (the same bytes on every Python), with
regroups of every kind (a replayed schedule: unties carrying optimizer state, ties dropping it, a root
re-tied, all tied, all untied), and reads the losses from the run's ``metrics.jsonl``.

    python tests/golden.py --record         # (re)write tests/golden/losses.json from the current code
    python tests/golden.py --check          # compare the current code with it, run by run

The values are specific to the library versions that computed them (``ENVIRONMENT``): elsewhere the
test skips and says so, rather than compare kernels of another build.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden", "losses.json")
sys.path.insert(0, os.path.join(ROOT, "tests"))
from zero_helper import write_reference_run  # noqa: E402

FAMILIES = ("gpt2", "llama", "bert", "vit")
# engine name -> (DeepSpeed config or None, ranks)
ENGINES = {"torch": (None, 1), "zero2-1rank": ("zero2.json", 1), "zero2-2ranks": ("zero2.json", 2)}
STEPS, EVERY = 27, 3  # eight decisions: the whole replayed schedule
# Relative agreement demanded of every step's loss: a different kernel build may move the last bits of
# an fp32 sum; a changed behaviour (lr, tie, data order, init) moves the loss by far more.
RTOL = 1e-5


def corpus_text(seed: int = 0, sentences: int = 6000) -> str:
    """Deterministic English-like text: Zipf-distributed pseudo-words in sentences and paragraphs.
    ``random.Random`` with an integer seed gives the same stream on every Python version."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    words = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(900)})
    weights = [1.0 / (rank + 1) for rank in range(len(words))]
    lines, paragraph = [], []
    for _ in range(sentences):
        sentence = " ".join(rng.choices(words, weights, k=rng.randint(4, 14)))
        paragraph.append(sentence[0].upper() + sentence[1:] + ".")
        if rng.random() < 0.2:
            lines.append(" ".join(paragraph))
            paragraph = []
    return "\n".join(lines) + "\n"


def environment() -> dict:
    """The versions of the libraries whose kernels and initialisers compute the losses."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "deepspeed", "sentencepiece", "scikit-learn"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def run_args(family: str, out_dir: str, work: str) -> list[str]:
    common = ["--out-dir", out_dir, "--cache-dir", os.path.join(work, "cache"), "--max-steps", str(STEPS),
              "--n-layer", "6", "--n-embd", "32", "--n-head", "2", "--batch-size", "4", "--lr", "2e-3",
              "--tie-policy", "replay", "--reference-run", os.path.join(work, "reference"),
              "--tie-every", str(EVERY), "--log-every", "1", "--eval-every", "100000", "--eval-batches", "1",
              "--no-checkpoints", "--no-progress", "--seed", "7"]
    if family == "vit":
        return common  # the digits scikit-learn ships
    corpus = os.path.join(work, "corpus.txt")
    return common + ["--train-file", corpus, "--seq-len", "16", "--vocab-size", "512"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare(work: str) -> None:
    corpus = os.path.join(work, "corpus.txt")
    if not os.path.exists(corpus):
        with open(corpus, "w", encoding="utf-8") as f:
            f.write(corpus_text())
    write_reference_run(os.path.join(work, "reference"))


def run_losses(family: str, engine: str, work: str, timeout: int = 600) -> list[float]:
    """Train one golden run; its per-step losses (rank 0's log: the mean over every rank's batch)."""
    _prepare(work)
    ds_config, ranks = ENGINES[engine]
    out = os.path.join(work, f"{family}-{engine}")
    args = [sys.executable, os.path.join(ROOT, "launchers", f"train_{family}.py"), *run_args(family, out, work)]
    if ds_config is not None:
        args += ["--deepspeed", os.path.join(ROOT, "ds_configs", ds_config)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MEGATIE_DEBUG")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    if ds_config is not None:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()), WORLD_SIZE=str(ranks))
    procs = []
    for rank in range(ranks):
        rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank)) if ds_config is not None else env
        procs.append(subprocess.Popen(args, env=rank_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    try:
        results = [p.communicate(timeout=timeout) + (p.returncode,) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for stdout, stderr, code in results:
        if code != 0:
            raise RuntimeError(f"{family}/{engine} failed ({code}): {(stdout + stderr)[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["loss"] for r in rows if r.get("event") == "train"]


def load_golden() -> dict:
    with open(GOLDEN) as f:
        return json.load(f)


def mismatch(expected: list[float], got: list[float]) -> str | None:
    """``None`` where every step agrees within ``RTOL``, else where and how they first differ."""
    if len(expected) != len(got):
        return f"{len(got)} steps logged, {len(expected)} pinned"
    for step, (a, b) in enumerate(zip(expected, got), start=1):
        if abs(a - b) > RTOL * abs(a):
            return f"step {step}: pinned {a!r}, now {b!r}"
    return None


def main(argv: list[str]) -> int:
    record = "--record" in argv
    golden = {"environment": environment(), "steps": STEPS, "runs": {}} if record else load_golden()
    failed = 0
    with tempfile.TemporaryDirectory() as work:
        for family in FAMILIES:
            for engine in ENGINES:
                losses = run_losses(family, engine, work)
                key = f"{family}/{engine}"
                if record:
                    golden["runs"][key] = losses
                    print(f"{key}: {losses[0]:.6f} .. {losses[-1]:.6f}")
                else:
                    problem = mismatch(golden["runs"][key], losses)
                    identical = losses == golden["runs"][key]
                    failed += problem is not None
                    print(f"{key}: {'bit-identical' if identical else problem or 'within rtol'}")
    if record:
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        with open(GOLDEN, "w") as f:
            json.dump(golden, f, indent=1)
            f.write("\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
