"""Speed settings applied once a run's model exists, before its engine: TF32 matmuls for fp32 runs on
CUDA (``--no-tf32`` opts out) and ``torch.compile`` of each transformer block (``--compile``).
``prepare_for_speed`` returns what the run records in its summary.

Why each block and not the whole model (PyTorch's "regional compilation"): every block runs the same
code, so one compiled graph serves all of them and compile time does not grow with depth (a
whole-model graph unrolls every block: 48 at the paper's shape); nothing outside the blocks
(embeddings, the LM head and its padding mask, the loss) is traced.

Why regroups do not recompile: ``torch.compile`` keeps graphs per code object, guarded on the inputs;
with nn modules inlined (torch's default since 2.5) a block's parameters are graph *inputs*, guarded
on their metadata (shape, dtype, device, requires_grad), not on which tensor object they are. A regroup
re-binds tensors of the same metadata between blocks (a tied block holds its root's ``nn.Parameter``,
an untied one a new tensor), so it compiles nothing, and no graph ever sees one tensor twice. A graph
is compiled, once, per grad mode (training; the no-grad evaluation and reward) and per kind of tensor a
block holds (trainable parameters, the frozen ones at the start of the paper's schedule, a frozen
replica's plain tensors) and batch shape (a --reward-batch-size other than --batch-size adds one): six
at most for one batch shape, whatever the number of blocks or regroups, under dynamo's limit
of eight per code object (beyond it, it would silently run the block uncompiled). Measured on the CPU
with torch 2.13: three graphs for qlearning's schedule (tests/test_speed.py), five for frozen-replica
through eight regroups, none added by a later regroup. (A whole-model compile also went through
regroups there without recompiling and with the same losses: per block is about compile time.)

The key/value cache a transformers block fills when ``use_cache`` is on is per block (layer index),
so dynamo guards on each block's cache slot and compiles once per block; training needs no cache,
so it is switched off on the model that is compiled.
"""

from __future__ import annotations

import torch

from megatie.engines.optim import fused_applies
from megatie.models.vocab import padded_vocab_size
from megatie.tying.layers import unique_parameters


def set_tf32(wanted: bool, device: torch.device, precision: str) -> bool:
    """TF32 tensor-core matmuls (and cuDNN convolutions) for an fp32 run on CUDA; returns whether on.

    The legacy flags rather than ``fp32_precision``: setting the new API makes every reader of the
    legacy ones (``torch.get_float32_matmul_precision``, libraries that check ``allow_tf32``) raise,
    while the legacy flags keep both readable. Nothing is touched on a CPU or for bf16/fp16 runs,
    whose matmuls do not run in fp32."""
    if torch.device(device).type != "cuda" or precision != "fp32":
        return False
    torch.backends.cuda.matmul.allow_tf32 = bool(wanted)
    torch.backends.cudnn.allow_tf32 = bool(wanted)
    return bool(wanted)


def compile_blocks(model, blocks) -> int:
    """Compile every block of ``blocks`` in place (``nn.Module.compile``: the module, its parameter
    names and the tie bindings stay as they are). Returns how many."""
    model.config.use_cache = False
    for block in blocks:
        block.compile()
    return len(blocks)


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process (every recompile adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def prepare_for_speed(model, tying, cfg, device: torch.device, vocab_size: int | None = None) -> dict:
    """Apply the run's speed settings to ``model``; returns the summary's record of them."""
    return {
        "tf32": set_tf32(cfg.engine.tf32, device, cfg.engine.precision),
        "compiled_blocks": compile_blocks(model, tying.blocks) if cfg.engine.compile else 0,
        # What build_adamw will choose (DeepSpeed with offloaded state excepted: the host steps it).
        "fused_adamw": fused_applies(unique_parameters(model, trainable_only=True)) and not _offloaded(cfg),
        # ``vocab_size``: the tokenizer's (the run's facts); None for images: classes, never padded.
        "padded_vocab_size": (None if vocab_size is None else padded_vocab_size(vocab_size, cfg.model.pad_vocab_to)),
    }


def _offloaded(cfg) -> bool:
    from megatie.engines.ds_config import offloads_optimizer

    return cfg.uses_deepspeed and offloads_optimizer(cfg.engine.deepspeed_config)
