"""Test-wide settings.

DeepSpeed picks its accelerator once per process. The exactness tests compare DeepSpeed with plain
torch references computed on the CPU, so DeepSpeed runs on its CPU accelerator (gloo) here even
where CUDA exists; the ``gpu``-marked tests run their DeepSpeed side in child processes with
``DS_ACCELERATOR=cuda`` and same-device references.
"""

import os

import pytest

os.environ["DS_ACCELERATOR"] = "cpu"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One data and tokenizer cache for every in-process trainer test: each corpus is prepared once."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def interpret():
    """Triton kernels run under its interpreter (a CPU checks their correctness, not their speed)."""
    pytest.importorskip("triton")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield
