"""Both engines implement megatie.engines.protocol.Engine, and the trainer holds one through it."""

from __future__ import annotations

import inspect

import pytest

from megatie.config import TrainConfig
from megatie.engines.protocol import Engine
from megatie.engines.torch_engine import TorchEngine
from megatie.trainer import Trainer

MEMBERS = [name for name in dir(Engine) if not name.startswith("_")] + ["regroups"]


def _defines(cls, name: str) -> bool:
    return any(name in vars(klass) for klass in cls.__mro__ if klass is not object)


@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_each_engine_defines_every_member_of_the_protocol(engine):
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
        from megatie.engines.deepspeed_engine import DeepSpeedEngine as cls
    else:
        cls = TorchEngine
    source = inspect.getsource(cls)
    for name in MEMBERS:
        assert _defines(cls, name) or f"self.{name} =" in source, f"{cls.__name__} lacks {name}"


def test_a_trainers_engine_is_an_engine(tmp_path, cache_dir):
    cfg = TrainConfig.from_flat(out_dir=str(tmp_path / "run"), cache_dir=cache_dir, n_layer=2, n_embd=32, n_head=2,
                                seq_len=16, batch_size=2, vocab_size=512, max_steps=3, tie_every=2, eval_batches=1,
                                progress=False, save_checkpoints=False, tie_policy="alternate")
    trainer = Trainer(cfg)
    assert isinstance(trainer.engine, Engine)
    trainer.train()
    assert trainer.engine.optimizer_steps == 3


def test_the_check_notices_a_missing_member():
    class Partial:
        regroups = 0

        def train_step(self, micro_batches):
            return None

    assert not isinstance(Partial(), Engine)
    assert not all(_defines(Partial, name) for name in MEMBERS)
