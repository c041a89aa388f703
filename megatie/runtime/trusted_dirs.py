"""Model, tokenizer and processor directories are data, never code.

transformers runs a directory's own Python when its JSON names it (``auto_map``) and the caller allows it,
and asks on the terminal when the caller says nothing. megatie says ``trust_remote_code=False`` on every
load, and refuses such a directory up front, in one line, before transformers is imported: a planted
``config.json`` must not get as far as a prompt, a module cache or a traceback.
"""

from __future__ import annotations

import json
import os

from megatie.errors import ConfigError

# The JSON files transformers reads from a model, tokenizer or processor directory.
DESCRIPTOR_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json",
                    "image_processor_config.json", "feature_extractor_config.json", "generation_config.json")
MAX_DESCRIPTOR_BYTES = 16 << 20  # a descriptor is small; a larger one is not one transformers wrote

# What transformers.from_pretrained takes from megatie, always.
NO_REMOTE_CODE = {"trust_remote_code": False}


def read_descriptor(path: str) -> dict | None:
    """A directory's JSON descriptor as a dict; None where it is absent. Bad JSON is one line."""
    if not os.path.isfile(path):
        return None
    if os.path.getsize(path) > MAX_DESCRIPTOR_BYTES:
        raise ConfigError(f"{path} is {os.path.getsize(path)} bytes; a model's descriptor is far smaller")
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ConfigError(f"{path} is not readable JSON ({type(e).__name__})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def refuse_remote_code(directory: str) -> None:
    """One line if any descriptor in ``directory`` asks transformers to import code from it."""
    for name in DESCRIPTOR_FILES:
        value = read_descriptor(os.path.join(directory, name))
        if value is None:
            continue
        if "auto_map" in value:
            raise ConfigError(f"{os.path.join(directory, name)} asks to run Python code shipped with the model "
                              "(auto_map); megatie loads only transformers' own classes and never runs a "
                              "directory's code")

