"""Model FLOPs per token (6 N + 12 L d T) and MFU: counted by hand, tied blocks still compute."""

import pytest

from megatie.metrics.flops import PEAK_TFLOPS, mfu, model_flops_per_token, peak_flops
from megatie.models.gpt2 import build_gpt2
from megatie.tying.layers import LayerTying


def _gpt2_by_hand(layers, d, vocab, seq):
    block = 12 * d * d + 13 * d          # attention (4 d^2 + 4 d), MLP (8 d^2 + 5 d), two layer norms (4 d)
    n = layers * block + vocab * d + 2 * d  # + the tied LM head, + the final layer norm; positions are a lookup
    return 6 * n + 12 * layers * d * seq


@pytest.mark.parametrize("state", [[0, 1, 2, 3], [0, 0, 0, 0], [0, 1, 0, 1]])
def test_flops_per_token_counts_every_position_tied_or_not(state):
    model = build_gpt2(4, 64, 4, 32, 300, seed=0)
    tying = LayerTying(model)
    tying.initialize(state)
    flops = model_flops_per_token(model, tying.untied_parameter_count(), 4, 64, 32)
    assert flops == _gpt2_by_hand(4, 64, 300, 32)


def test_peak_lookup_by_device_name_and_override():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == PEAK_TFLOPS["H100"]["bf16"] * 1e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert peak_flops("NVIDIA H200", "fp32") == PEAK_TFLOPS["H200"]["fp32"] * 1e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "fp16") == 312e12
    assert peak_flops("NVIDIA GeForce RTX 4090", "bf16") is None
    assert peak_flops("NVIDIA GeForce RTX 4090", "bf16", override_tflops=165.2) == pytest.approx(165.2e12)


def test_mfu_per_device_and_none_without_a_peak():
    # 1e9 FLOPs/token at 1e5 tokens/s over two devices of 1e14 peak: 50% each.
    assert mfu(10 ** 9, 1e5, 2, 1e14) == pytest.approx(0.5)
    assert mfu(10 ** 9, 1e5, 1, None) is None
