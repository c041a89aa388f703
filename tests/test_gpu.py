"""What only a CUDA device can show; every test here is skipped without one.

DeepSpeed runs in a child process with ``DS_ACCELERATOR=cuda`` (this process keeps DeepSpeed on its
CPU accelerator for the exactness tests, see conftest.py); its reference runs in this process on the
same device. ``benchmarks/gpu_suite.py`` runs these first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPER = os.path.join(ROOT, "tests", "zero_helper.py")
# Deterministic cuBLAS, in this process and the child alike.
DETERMINISTIC = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "MEGATIE_TEST_DETERMINISTIC": "1"}


def test_multi_tensor_copy_on_cuda_is_bitwise():
    from megatie.kernels import multi_tensor_copy_

    torch.manual_seed(0)
    shapes = [(1600,), (1600, 4800), (7,), (3, 5), (1 << 20,)]
    for backend in ("triton", "auto"):
        srcs = [torch.randn(s, device="cuda").to(dt) for s in shapes for dt in (torch.float32, torch.bfloat16)]
        dsts = [torch.empty_like(s) for s in srcs]
        multi_tensor_copy_(dsts, srcs, backend=backend)
        torch.cuda.synchronize()
        assert all(torch.equal(d.view(torch.uint8), s.view(torch.uint8)) for d, s in zip(dsts, srcs)), backend


def test_peak_memory_survives_a_reset_on_cuda():
    """A reset of the CUDA peak counters (as DeepSpeed's empty_cache() makes) cannot hide an earlier peak."""
    from megatie.metrics.memory import MemoryMonitor

    monitor = MemoryMonitor("cuda").start()
    big = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device="cuda")
    del big
    torch.cuda.reset_peak_memory_stats()
    small = torch.empty(2 ** 20, dtype=torch.uint8, device="cuda")
    result = monitor.stop()
    del small
    assert result["peak_bytes"] >= 256 * 2 ** 20 > torch.cuda.max_memory_allocated()
    assert result["resets_folded"] == 1 and result["peak_reserved_bytes"] >= result["peak_bytes"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(out: str, reference: str) -> list[str]:
    from zero_helper import base_args

    # No clipping: DeepSpeed's clipping formula differs from torch's in the last bits. No TF32: it rounds
    # matmul operands to 10 bits, so operands that differ in their last bits can round apart and magnify
    # the differences this comparison bounds. Both sides use the fused AdamW (CUDA tensors).
    return base_args(out, reference, steps=40, every=10) + ["--grad-clip", "0", "--no-checkpoints", "--no-tf32"]


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_on_cuda_matches_the_same_device_reference(tmp_path, monkeypatch, stage):
    """ZeRO-2 and ZeRO-3 (every tensor partitioned) fp32 on the GPU through three regroups against the plain-torch engine on the same GPU,
    both with deterministic algorithms. Tolerance 1e-4 relative: the same kernels on the same device,
    cuBLAS free only to pick algorithms by operand alignment (DeepSpeed's weights are views into one
    flat buffer); a lost or misplaced optimizer state moves these losses by far more (the CPU
    mutation tests in test_zero.py)."""
    from megatie.tools.train_cli import build_parser, config_from_args
    from megatie.trainer import Trainer
    from zero_helper import record_losses, write_reference_run

    reference = write_reference_run(str(tmp_path / "ref"))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(DETERMINISTIC, DS_ACCELERATOR="cuda", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), MEGATIE_TEST_OUT=str(tmp_path / "res"),
               PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    config = os.path.join(ROOT, "ds_configs", "zero2.json")
    if stage == 3:
        config = str(tmp_path / "zero3.json")
        with open(config, "w") as f:
            json.dump({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}, f)
    proc = subprocess.run([sys.executable, HELPER, *_args(str(tmp_path / "ds"), reference), "--deepspeed", config],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    result = json.load(open(tmp_path / "res" / "rank0.json"))
    assert result["regroups"] >= 3 and result["summary"]["peak_memory_bytes"] > 0

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", DETERMINISTIC["CUBLAS_WORKSPACE_CONFIG"])
    torch.use_deterministic_algorithms(True, warn_only=True)  # where a kernel has no deterministic variant, it warns
    try:
        trainer = Trainer(config_from_args(build_parser().parse_args(_args(str(tmp_path / "torch"), reference))),
                          device=torch.device("cuda"))
        expected = record_losses(trainer)
        trainer.train()
    finally:
        torch.use_deterministic_algorithms(False)
    rel = max(abs(a - b) / abs(b) for a, b in zip(result["losses"], expected))
    assert len(result["losses"]) == len(expected) == 40 and rel <= 1e-4, rel
