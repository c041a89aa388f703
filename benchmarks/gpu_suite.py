"""Every GPU claim from one command, on one H100/H200-class GPU, in under nine minutes.

Steps, in order (``--dry-run`` lists them with time estimates):

1. environment: device, driver-visible memory, library versions;
2. prepare-data: the embedded corpus tokenized once into the cache the runs read (a cache made on
   another machine and carried along makes this a few seconds);
3. gpu-tests: ``pytest -m gpu`` (copy kernel on CUDA, peak memory across resets, DeepSpeed on the
   GPU against the same-device torch reference through regroups);
4. copy-kernel: the copy kernel (one-shot and a reused ``CopyPlan``) and ``auto`` against
   ``torch._foreach_copy_``, a plain loop and one contiguous copy, with host time per call;
5. memory-bf16-ac / memory-bf16: the paper's Table 3 shape (GPT-2 48 x 1600, 16 heads, micro-batch
   16, sequence 256, ZeRO-2, bf16), conventional vs megatie, with and without activation
   checkpointing - honest peaks, NVML averages, tokens per second for both (throughput), and
   megatie's regroup time against its step time and carried bytes against its optimizer state;
6. memory-fp32-ac (optional): the same in fp32;
7. probe-memory (optional): ``split``'s gradient probe at the paper's shape, exact and sketched;
   memory-zero3-bf16-ac (optional): the Table 3 shape under ZeRO-3 (weights partitioned too);
8. depth-pays (optional, with ``--depth-train-file`` and ``--depth-valid-file``): whether depth pays at
   GPT-2 124M's width - 12 blocks of 768 against untied models with at most a third of their
   parameters (3x768, 1x1152), and whether tying pays there: the same 12 blocks under ``split`` (three
   roots, ~0.30x with the 8192-token vocabulary) and ``alternate`` (two, ~0.23x) against the best untied
   model, ``benchmarks/depth_grid.py``. On two CPU cores depth pays at 6x64 but no tied model at a third
   recovers it (benchmarks/RESULTS.md, "The deep regime").

A step that fails is recorded (exit status, output tail) and the suite goes on; optional steps are
skipped when their estimate exceeds what is left of ``--budget-seconds``. One JSON (``--out``) and a
markdown table next to it. On an offline GPU machine without DeepSpeed (README, "GPU machines"):

    pip install --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD python benchmarks/gpu_suite.py --out results/gpu_suite.json

``--smoke`` runs every step at a tiny shape, on a CPU too: the suite's own check.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = dict(n_layer=48, n_embd=1600, n_head=16, seq_len=256, batch_size=16, vocab_size=8192, max_steps=45,
             tie_every=15)
SMOKE = dict(n_layer=4, n_embd=64, n_head=2, seq_len=32, batch_size=2, vocab_size=512, max_steps=8, tie_every=3)
ENVIRONMENT = """
import json, torch, transformers, deepspeed
try:
    import triton; triton_version = triton.__version__
except ImportError:
    triton_version = None
cuda = torch.cuda.is_available()
print(json.dumps({"device": torch.cuda.get_device_name(0) if cuda else "cpu",
                  "device_memory_bytes": torch.cuda.get_device_properties(0).total_memory if cuda else None,
                  "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
                  "deepspeed": deepspeed.__version__, "triton": triton_version}))
"""


@dataclass
class Step:
    name: str
    estimate_s: int
    command: list[str]
    optional: bool = False
    outputs: list[str] = field(default_factory=list)


def shape_flags(shape: dict) -> list[str]:
    return [x for k, v in shape.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def plan(args) -> list[Step]:
    py, shape = sys.executable, SMOKE if args.smoke else PAPER
    out = os.path.dirname(os.path.abspath(args.out))
    cache = ["--cache-dir", args.cache_dir]
    prepare = (f"from megatie.data import build_lm_data; build_lm_data(seq_len={shape['seq_len']}, "
               f"vocab_size={shape['vocab_size']}, cache_dir={args.cache_dir!r})")
    cached = os.path.isdir(os.path.join(os.path.expanduser(args.cache_dir), "prepared"))

    def memory(name, config, checkpointing, estimate, optional=False):
        target = os.path.join(out, f"{name}.json")
        cmd = [py, "benchmarks/memory.py", "--ds-config", f"ds_configs/{config}", *shape_flags(shape), *cache,
               "--out", target] + (["--activation-checkpointing"] if checkpointing else [])
        return Step(name, estimate, cmd, optional, [target])

    probe = os.path.join(out, "probe_memory.json")
    steps = [
        Step("environment", 10, [py, "-c", ENVIRONMENT]),
        Step("prepare-data", 10 if cached else 90, [py, "-c", prepare]),
        Step("gpu-tests", 90, [py, "-m", "pytest", "-q", "-m", "gpu", "tests"]),
        Step("copy-kernel", 45, [py, "benchmarks/copy_kernel.py", "--quick", "--out",
                                 os.path.join(out, "copy_kernel.json")], outputs=[os.path.join(out, "copy_kernel.json")]),
        memory("memory-bf16-ac", "zero2_bf16.json", True, 150),
        memory("memory-bf16", "zero2_bf16.json", False, 140),
        memory("memory-fp32-ac", "zero2.json", True, 200, optional=True),
        Step("probe-memory", 60, [py, "benchmarks/probe_memory.py", "--n-layer", str(shape["n_layer"]), "--n-embd",
                                  str(shape["n_embd"]), "--seq-len", str(shape["seq_len"]), "--batch", "1",
                                  "--out", probe], optional=True, outputs=[probe]),
        memory("memory-zero3-bf16-ac", "zero3_bf16.json", True, 170, optional=True),
    ]
    return steps + depth_step(py, args, out)



def depth_step(py, args, out) -> list[Step]:
    """The optional quality step: only where the user carried a corpus to train on (the machine is offline)."""
    if not (args.depth_train_file and args.depth_valid_file):
        return []
    grid = os.path.join(out, "depth_grid")
    shapes = ["--base", "4x64/2", "--candidates", "1x64/2", "--steps", "8", "--seeds", "0", "--lrs", "1e-3",
              "--batch-size", "2", "--seq-len", "32"] if args.smoke else \
        ["--base", "12x768/12", "--candidates", "3x768/12,1x1152/12,12x768/12@split,12x768/12@alternate", "--steps", "1500", "--seeds", "0",
         "--lrs", "6e-4", "--batch-size", "16", "--seq-len", "256", "--vocab-size", "8192"]
    return [Step("depth-pays", 60 if args.smoke else 600,
                 [py, "benchmarks/depth_grid.py", "--train-file", args.depth_train_file, "--valid-file",
                  args.depth_valid_file, *shapes, "--out-dir", grid, "--cache-dir", args.cache_dir],
                 optional=True, outputs=[os.path.join(grid, "depth_grid.json")])]


def run_step(step: Step, remaining: float) -> dict:
    record = {"name": step.name, "estimate_s": step.estimate_s, "command": step.command}
    if step.optional and step.estimate_s > remaining:
        return {**record, "status": "skipped", "reason": f"estimate {step.estimate_s}s > {remaining:.0f}s left"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(step.command, cwd=ROOT, capture_output=True, text=True,
                              timeout=max(60, int(2 * step.estimate_s)))
        record.update(returncode=proc.returncode, output_tail=(proc.stdout + proc.stderr)[-3000:])
        record["status"] = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired as e:
        record.update(status="failed", reason=f"timed out after {e.timeout}s")
    record["wall_s"] = round(time.perf_counter() - t0, 1)
    for path in step.outputs:
        if os.path.isfile(path):
            with open(path) as f:
                record.setdefault("results", {})[os.path.basename(path)] = json.load(f)
    if step.name == "environment" and record.get("status") == "ok":
        record["results"] = json.loads(record["output_tail"].strip().splitlines()[-1])
    return record


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown(report: dict) -> str:
    mb = 2 ** 20
    lines = ["| step | status | wall s (estimate) |", "|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s.get('wall_s', '-')} ({s['estimate_s']}) |" for s in report["steps"]]
    for s in report["steps"]:
        memory = (s.get("results") or {}).get(f"{s['name']}.json")
        if not memory:
            continue
        lines += ["", f"**{s['name']}** ({memory['ds_config']}, activation checkpointing "
                      f"{memory['settings']['activation_checkpointing']})", "",
                  "| | peak alloc MB | peak reserved MB | NVML peak MB | NVML avg MB | tokens/s | MFU | regroup/step | transient / rank's state |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name in ("conventional", "megatie"):
            r = memory[name]
            cells = [r.get(k) for k in ("peak_memory_bytes", "peak_reserved_bytes", "peak_sampled_bytes", "avg_memory_bytes")]
            lines.append(f"| {name} | " + " | ".join("-" if c is None else f"{c / mb:,.0f}" for c in cells)
                         + f" | {r['tokens_per_second']:,.0f} | {_fmt(r['mfu'])} | {_fmt(r['regroup_over_step'])} | "
                           f"{_fmt(r['max_transient_over_rank_state'])} |")
        ratio = memory["ratio_conventional_over_megatie"]
        lines.append("| conventional / megatie | " + " | ".join(
            f"{ratio[k]:.2f}x" if k in ratio else "-" for k in ("peak_memory_bytes", "peak_reserved_bytes",
                                                               "peak_sampled_bytes", "avg_memory_bytes")) + " | | | | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "gpu_suite.json"))
    p.add_argument("--budget-seconds", type=float, default=540.0, help="optional steps must fit in what is left")
    p.add_argument("--cache-dir", default=os.path.join(ROOT, ".cache", "megatie"),
                   help="tokenizer and token shards (prepare here, carry along)")
    p.add_argument("--depth-train-file", help="text to train the optional depth-pays step on (none: skipped)")
    p.add_argument("--depth-valid-file", help="its held-out text")
    p.add_argument("--smoke", action="store_true", help="tiny shapes: checks the suite itself, on any machine")
    p.add_argument("--dry-run", action="store_true", help="list the steps and their estimates; run nothing")
    p.add_argument("--prepare-only", action="store_true", help="only tokenize the corpus into --cache-dir")
    args = p.parse_args(argv)
    steps = plan(args)
    if args.prepare_only:
        steps = [s for s in steps if s.name == "prepare-data"]
    if args.dry_run:
        report = {"steps": [{k: v for k, v in asdict(s).items() if k != "outputs"} for s in steps],
                  "estimate_total_s": sum(s.estimate_s for s in steps if not s.optional),
                  "estimate_with_optional_s": sum(s.estimate_s for s in steps)}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        for s in steps:
            print(f"{s.name:16} {s.estimate_s:5d} s{'  (optional)' if s.optional else ''}")
        print(f"{'total':16} {report['estimate_total_s']:5d} s (with optional steps {report['estimate_with_optional_s']} s)")
        return 0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    t0, records = time.perf_counter(), []
    for step in steps:
        records.append(run_step(step, args.budget_seconds - (time.perf_counter() - t0)))
        print(f"{step.name:16} {records[-1]['status']:8} {records[-1].get('wall_s', '-')} s", flush=True)
    report = {"steps": records, "wall_s": round(time.perf_counter() - t0, 1), "smoke": args.smoke,
              "shape": SMOKE if args.smoke else PAPER}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(markdown(report))
    print(markdown(report))
    return 0 if all(r["status"] != "failed" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
