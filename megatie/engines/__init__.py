"""Optimisation engines: what turns a model, its tie groups and a batch into a training step.

Two peers with one interface - ``train_step(micro_batches) -> loss`` (a 0-dim tensor on the device, read when the caller chooses), ``regroup(plan) -> record``,
``lr``, ``optimizer_state_bytes()``, ``state_dict`` / ``load_state_dict``, ``save_checkpoint``:

- ``TorchEngine``: one process, plain torch AdamW; the reference every other engine is tested against;
- ``DeepSpeedEngine``: DeepSpeed ZeRO stages 0-2 on any number of ranks;
- ``Zero3Engine``: its stage-3 variant, parameters partitioned too.

``build_engine`` picks one from the run's config; the trainer, the tests and the benchmarks all build
engines through it. An optional *observer* sees ``after_backward(engine)`` and, during a regroup,
after each regroup ``at_regroup_peak(engine, peak_bytes)`` (its measured peak; the memory benchmark's probe). No engine imports the trainer.
"""

from __future__ import annotations

import contextlib


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


def whole_weights(engine):
    """A context in which every parameter is whole on every rank: ZeRO-3 gathers them (the gradient probe
    reads all blocks at once); elsewhere they already are."""
    full = getattr(engine, "full_weights", None)
    return full() if full is not None else contextlib.nullcontext()


def build_engine(model, cfg, device, sync=None, observer=None):
    """The engine ``cfg`` asks for: DeepSpeed when it carries a DeepSpeed config, plain torch otherwise."""
    if cfg.engine.activation_checkpointing:
        enable_activation_checkpointing(model)
    if cfg.uses_deepspeed:
        from megatie.engines.ds_config import zero_stage_of
        from megatie.runtime.distributed import RankSync

        if zero_stage_of(cfg.engine.deepspeed_config) == 3:
            from megatie.engines.zero3_engine import Zero3Engine as DeepSpeedEngine
        else:
            from megatie.engines.deepspeed_engine import DeepSpeedEngine
        return DeepSpeedEngine(model, cfg, device, sync or RankSync(device=device), observer)
    from megatie.engines.torch_engine import TorchEngine

    if sync is not None and sync.world_size > 1:
        from megatie.errors import ConfigError

        raise ConfigError("the plain torch engine runs in one process; pass --deepspeed CONFIG for several ranks")
    return TorchEngine(model, cfg, device, observer)


def check_checkpoint_engine(optimizer_state: dict, cfg, world_size: int) -> None:
    """The checkpoint's engine, ZeRO stage, precision and rank count against this run's - checked
    before anything is built, as an optimizer state only loads into the same layout."""
    from megatie.errors import CheckpointError

    uses_deepspeed = cfg.uses_deepspeed
    written_by_deepspeed = isinstance(optimizer_state, dict) and "deepspeed" in optimizer_state
    if written_by_deepspeed and uses_deepspeed:
        from megatie.engines.ds_config import zero_stage_of

        info = optimizer_state["deepspeed"]
        for key, mine in (("world_size", world_size), ("stage", zero_stage_of(cfg.engine.deepspeed_config)),
                          ("precision", cfg.engine.precision)):
            if info.get(key) != mine:
                raise CheckpointError(f"the checkpoint was written with {key}={info.get(key)!r}, this run has "
                                      f"{mine!r}; resume with the same DeepSpeed setup")
    if written_by_deepspeed and not uses_deepspeed:
        info = optimizer_state["deepspeed"]
        raise CheckpointError(f"this checkpoint was written by the DeepSpeed engine (ZeRO stage {info.get('stage')}, "
                              f"{info.get('world_size')} rank(s), {info.get('precision')}); resume it under deepspeed "
                              "with --deepspeed CONFIG")
    if uses_deepspeed and not written_by_deepspeed:
        raise CheckpointError("this checkpoint was not written by the DeepSpeed engine; resume it without --deepspeed")
