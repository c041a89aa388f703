"""Data pipeline: sources -> tokenizer -> memory-mapped token shards -> resumable loaders.

Names are imported lazily so that tokenizer worker processes and ``prepare_data`` (which
only need ``megatie.data.shards``) do not pay for importing torch.
"""
import importlib

_EXPORTS = {
    "LMData": "api", "build_lm_data": "api", "make_corpus": "api",
    "SplitTokens": "loader", "TokenBatchLoader": "loader",
    "MLMCollator": "mlm", "open_tokens": "prepared", "prepare": "shards",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"megatie.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'megatie.data' has no attribute {name!r}")
