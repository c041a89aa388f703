"""Model FLOPs per token and model FLOPs utilisation (MFU), counted the standard way.

FLOPs per token = 6 N + 12 L d T (PaLM, appendix B; the same count as nanoGPT's ``estimate_mfu`` and
Megatron-LM's): N is every parameter a token's forward pass multiplies with - each block counted at
every position it sits, tied or not (a tied block still computes), the output projection (GPT-2's
tied token embedding) once, embedding lookups not at all - and 12 L d T the attention scores and
their weighted sum over a sequence of T positions in L blocks of width d. Forward 2, backward 4:
hence the 6. Recomputation (activation checkpointing) is work the model does not need and MFU, by
definition, does not count it.

MFU = model FLOPs per second per device / the device's dense peak at the run's precision. There is
no MFU on a CPU.
"""

from __future__ import annotations

from torch import nn

# Dense peak TFLOPS per GPU (vendor data sheets, without sparsity); fp32 without TF32. The first
# name contained in the device's name wins, so the more specific names come first.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9},
    "H100 NVL": {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.2},
    "H100": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
}


def peak_flops(device_name: str, precision: str, override_tflops: float | None = None) -> float | None:
    """The device's dense peak FLOPs per second at ``precision``; None for a device not in the table
    (pass ``--peak-tflops``) and for CPUs."""
    if override_tflops is not None:
        return override_tflops * 1e12
    for name, peaks in PEAK_TFLOPS.items():
        if name.lower() in device_name.lower():
            return peaks[precision] * 1e12
    return None


def model_flops_per_token(model: nn.Module, untied_parameters: int, n_layer: int, n_embd: int, seq_len: int) -> int:
    """6 N + 12 L d T for ``model``, whose parameters with every block untied number ``untied_parameters``."""
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    lookups = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    if outputs is not None and outputs.weight is inputs.weight:
        lookups = [m for m in lookups if m is not inputs]  # it also projects the output: it multiplies
    n = untied_parameters - sum(m.weight.numel() for m in lookups)
    return 6 * n + 12 * n_layer * n_embd * seq_len


def mfu(flops_per_token: int, tokens_per_second: float, devices: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation of each of ``devices`` devices sharing ``tokens_per_second``."""
    if not peak or not tokens_per_second:
        return None
    return flops_per_token * tokens_per_second / devices / peak
