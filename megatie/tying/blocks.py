"""Where a model keeps its stack of identical transformer blocks (what ``LayerTying`` ties)."""

from __future__ import annotations

from torch import nn

from megatie.errors import ConfigError

# Where the stack of identical blocks lives in common transformers classes (newer releases moved
# some; the first path that exists wins).
KNOWN_BLOCK_PATHS: dict[str, str | tuple[str, ...]] = {
    "GPT2LMHeadModel": "transformer.h",
    "GPT2Model": "h",
    "BertForMaskedLM": "bert.encoder.layer",
    "BertForPreTraining": "bert.encoder.layer",
    "BertModel": "encoder.layer",
    "LlamaForCausalLM": "model.layers",
    "LlamaModel": "layers",
    "ViTForImageClassification": ("vit.layers", "vit.encoder.layer"),
    "ViTForMaskedImageModeling": ("vit.layers", "vit.encoder.layer"),
    "ViTModel": ("layers", "encoder.layer"),
}


def _get_submodule(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ConfigError(f"{type(model).__name__} has no submodule {path!r}") from None


def find_blocks(model: nn.Module, block_path: str | None = None) -> tuple[str, nn.ModuleList]:
    """Return ``(path, ModuleList)`` of the model's identical transformer blocks.

    ``block_path`` names it explicitly; otherwise known classes are looked up and, failing that,
    the longest ``ModuleList`` whose children share one class is taken.
    """
    path = block_path
    if path is None:
        candidates = KNOWN_BLOCK_PATHS.get(type(model).__name__, ())
        for candidate in (candidates,) if isinstance(candidates, str) else candidates:
            try:
                model.get_submodule(candidate)
                path = candidate
                break
            except AttributeError:
                continue
    if path is None:
        best: tuple[str, nn.ModuleList] | None = None
        for name, module in model.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) >= 1:
                if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best[1])):
                    best = (name, module)
        if best is None:
            raise ConfigError(
                f"cannot find the transformer blocks of {type(model).__name__}; pass the path of "
                "their ModuleList explicitly (e.g. 'transformer.h')"
            )
        path = best[0]
    blocks = _get_submodule(model, path)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ConfigError(f"{path!r} in {type(model).__name__} is not a non-empty ModuleList of blocks")
    return path, blocks
