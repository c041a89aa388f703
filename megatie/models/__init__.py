"""Model families: one module per family, each a ``ModelSpec`` (see ``spec.py``).

A family module builds its transformers model from a run's shape settings, names where its blocks
live and its causal or masked objective. ``get_spec(name)`` imports only the family asked for (each
pulls in transformers), so the launchers' parsers stay light; the names themselves are in
``MODEL_FAMILIES``.
"""
from __future__ import annotations

import importlib

from megatie.models.spec import ModelSpec, quiet_build

__all__ = ["MODEL_FAMILIES", "ModelSpec", "family_of_class", "get_spec", "quiet_build"]

# Model families (``megatie.models.<name>`` builds each); each has a launcher, launchers/train_<name>.py.
MODEL_FAMILIES: tuple[str, ...] = ("gpt2", "llama", "bert", "vit")


def get_spec(family: str) -> ModelSpec:
    if family not in MODEL_FAMILIES:
        from megatie.errors import ConfigError

        raise ConfigError(f"unknown model family {family!r}; choose one of {', '.join(MODEL_FAMILIES)}")
    return importlib.import_module(f"megatie.models.{family}").SPEC


def family_of_class(hf_class: str) -> ModelSpec:
    """The family whose runs leave a ``hf_class`` model; a class named by a file is checked against ours
    before anything is built from it."""
    for family in MODEL_FAMILIES:
        spec = get_spec(family)
        if spec.hf_class == hf_class:
            return spec
    from megatie.errors import ConfigError

    known = ", ".join(get_spec(f).hf_class for f in MODEL_FAMILIES)
    raise ConfigError(f"the model class {hf_class!r} is not one megatie trains ({known})")

