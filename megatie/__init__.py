"""megatie: dynamic layer tying for transformer training on DeepSpeed.

The state algebra is imported eagerly (it is plain Python); everything that needs torch is
imported on first use, so ``import megatie`` stays cheap for tools such as data preparation.
"""

from megatie.errors import CheckpointError, ConfigError, DataError, MegatieError
from megatie.tying.tie_map import (
    Transition,
    groups,
    identity_state,
    num_independent,
    permute_state,
    roots,
    state_from_action,
    transition,
    validate_action,
    validate_state,
)

__version__ = "0.1.0"

_LAZY = {
    "LayerTying": "megatie.tying.layers",
    "find_blocks": "megatie.tying.layers",
    "count_parameters": "megatie.tying.layers",
    "QLearningAgent": "megatie.tying.agent",
    "QNetwork": "megatie.tying.agent",
    "build_policy": "megatie.tying.registry",
    "TieController": "megatie.tying.controller",
    "regroup_optimizer": "megatie.engines.optim",
    "TrainConfig": "megatie.config",
    "Trainer": "megatie.trainer",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'megatie' has no attribute {name!r}")


__all__ = [
    "CheckpointError", "ConfigError", "DataError", "MegatieError", "Transition", "groups", "identity_state",
    "num_independent", "permute_state", "roots", "state_from_action", "transition", "validate_action",
    "validate_state", *_LAZY,
]
