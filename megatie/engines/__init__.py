"""Optimisation engines: what turns a model, its tie groups and a batch into a training step.

Two peers with one interface - ``train_step(micro_batches) -> loss`` (a 0-dim tensor on the device, read when the caller chooses), ``regroup(plan) -> record``,
``lr``, ``optimizer_state_bytes()``, ``state_dict`` / ``load_state_dict``, ``save_checkpoint``:

- ``TorchEngine``: one process, plain torch AdamW; the reference every other engine is tested against;
- ``DeepSpeedEngine``: DeepSpeed ZeRO stages 0-2 on any number of ranks.

``build_engine`` picks one from the run's config; the trainer, the tests and the benchmarks all build
engines through it. An optional *observer* sees ``after_backward(engine)`` and, during a regroup,
``at_regroup_peak(engine, carried)`` (the memory benchmark's probe). No engine imports the trainer.
"""

from __future__ import annotations


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant recomputation of every block: recomputation stays inside the one backward graph,
    so a tied tensor's gradient is accumulated once per step and ZeRO's hook fires once (the reentrant
    variant runs a backward per block: "gradient computed twice", DeepSpeed #2103). The method's name
    changed in transformers 5."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build_engine(model, cfg, device, sync=None, observer=None):
    """The engine ``cfg`` asks for: DeepSpeed when it carries a DeepSpeed config, plain torch otherwise."""
    if cfg.engine.activation_checkpointing:
        enable_activation_checkpointing(model)
    if cfg.uses_deepspeed:
        from megatie.engines.deepspeed_engine import DeepSpeedEngine
        from megatie.runtime.distributed import RankSync

        return DeepSpeedEngine(model, cfg, device, sync or RankSync(device=device), observer)
    from megatie.engines.torch_engine import TorchEngine

    if sync is not None and sync.world_size > 1:
        from megatie.errors import ConfigError

        raise ConfigError("the plain torch engine runs in one process; pass --deepspeed CONFIG for several ranks")
    return TorchEngine(model, cfg, device, observer)
