"""Physical layer tying on Hugging Face transformer models (docs/method.md, "How blocks share weights").

``LayerTying`` owns the list of identical blocks of a model and binds, for every block and every
parameter slot inside it (``attn.c_attn.weight``, ...), the tensor that block computes with:

- a **root** (``state[i] == i``) holds its own ``nn.Parameter``;
- a **member** of root r in ``shared`` mode holds *the same* ``nn.Parameter`` object as r
  (aliasing inside distinct block modules, so buffers and ``layer_idx`` stay per block); autograd
  adds the gradients of every position into r's tensor and the member keeps no storage;
- a member in ``frozen-replica`` mode holds a plain, detached view of r's tensor (re-bound before
  every forward, because ZeRO re-points ``param.data`` after each step); it reads r's weights and
  sends no gradient — the behaviour of the paper's public code, kept for comparison;
- a **frozen** block (the start of the paper's schedule) holds its own initial weights with
  ``requires_grad=False`` until the first decision touches it.

``apply(new_state)`` moves to a new state with snapshot semantics: every copy reads the weights as
they were before the decision. It returns a ``RegroupPlan`` that tells an optimizer which tensors
survive, which are new and where each new tensor's optimizer state must come from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

from megatie.errors import ConfigError
from megatie.kernels import multi_tensor_copy_

# The mode names are defined torch-free (for the launcher's parser) and re-exported here.
from megatie.tying.options import TIE_MODES  # noqa: F401
from megatie.tying.tie_map import (
    Transition,
    num_independent,
    transition,
    validate_state,
)

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


@dataclass
class RegroupPlan:
    """What a decision did to the set of trainable tensors.

    ``created`` maps each new trainable tensor to the tensor whose optimizer state it inherits
    (``None``: start fresh, e.g. a frozen block that begins to train). ``removed`` lists trainable
    tensors that left the model; their optimizer state must be dropped.
    """

    transition: Transition
    old_state: list[int]
    new_state: list[int]
    created: list[tuple[nn.Parameter, nn.Parameter | None]] = field(default_factory=list)
    removed: list[nn.Parameter] = field(default_factory=list)

    @property
    def changes_parameters(self) -> bool:
        return bool(self.created or self.removed)


def _bind(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put ``value`` in slot ``name`` of ``module``, as a parameter or as a plain tensor."""
    if isinstance(value, nn.Parameter):
        if name not in module._parameters and name in module.__dict__:
            del module.__dict__[name]
        module._parameters[name] = value
    else:
        module._parameters.pop(name, None)
        object.__setattr__(module, name, value)


class LayerTying:
    """Binds the blocks of ``model`` to a tying state; see the module docstring."""

    def __init__(self, model: nn.Module, mode: str = "shared", block_path: str | None = None):
        if mode not in TIE_MODES:
            raise ConfigError(f"unknown tie mode {mode!r}; choose one of {', '.join(TIE_MODES)}")
        self.model = model
        self.mode = mode
        self.block_path, self.blocks = find_blocks(model, block_path)
        self.num_blocks = len(self.blocks)
        self.slots = self._discover_slots()
        self.state: list[int] = list(range(self.num_blocks))
        self.frozen: set[int] = set()
        # Each root's parameters per slot; members and frozen blocks are derived from this.
        self._root_params: dict[int, list[nn.Parameter]] = {
            i: [getattr(self._slot_module(i, k), n) for k, (_, n) in enumerate(self.slots)]
            for i in range(self.num_blocks)
        }
        self._frozen_params: dict[int, list[nn.Parameter]] = {}
        if mode == "frozen-replica":
            for i, block in enumerate(self.blocks):
                block.register_forward_pre_hook(self._make_refresh_hook(i))

    # ----------------------------------------------------------------- structure
    def _discover_slots(self) -> list[tuple[str, str]]:
        reference = None
        for i, block in enumerate(self.blocks):
            shapes = [
                (name, tuple(p.shape), p.dtype) for name, p in block.named_parameters(remove_duplicate=False)
            ]
            if reference is None:
                reference = shapes
            elif shapes != reference:
                raise ConfigError(
                    f"block {i} of {self.block_path!r} differs from block 0 in its parameters; "
                    "only identical blocks can be tied"
                )
        if not reference:
            raise ConfigError(f"the blocks under {self.block_path!r} have no parameters to tie")
        return [tuple(name.rsplit(".", 1)) if "." in name else ("", name) for name, _, _ in reference]

    def _slot_module(self, block: int, slot: int) -> nn.Module:
        prefix = self.slots[slot][0]
        return self.blocks[block].get_submodule(prefix) if prefix else self.blocks[block]

    def block_tensors(self, block: int) -> list[torch.Tensor]:
        """The tensors block ``block`` computes with, one per slot, in slot order."""
        if block in self.frozen:
            return list(self._frozen_params[block])
        return list(self._root_params[self.state[block]])

    def root_parameters(self, root: int) -> list[nn.Parameter]:
        return list(self._root_params[root])

    def _bind_all(self) -> None:
        for i in range(self.num_blocks):
            if i in self.frozen:
                tensors = self._frozen_params[i]
            else:
                root = self.state[i]
                tensors = self._root_params[root]
                if root != i and self.mode == "frozen-replica":
                    tensors = [p.detach() for p in tensors]
            for k, (_, name) in enumerate(self.slots):
                _bind(self._slot_module(i, k), name, tensors[k])

    def _make_refresh_hook(self, block: int):
        def refresh(module, args):
            root = self.state[block]
            if block in self.frozen or root == block:
                return None
            for k, (_, name) in enumerate(self.slots):
                object.__setattr__(self._slot_module(block, k), name, self._root_params[root][k].detach())
            return None

        return refresh

    # ----------------------------------------------------------------- initial state
    def initialize(self, state: Sequence[int], frozen: Iterable[int] = ()) -> None:
        """Set the starting state on a freshly built model, before any optimizer exists.

        Blocks in ``frozen`` keep their own initial weights, untrainable, until a decision touches
        them; members of ``state`` are tied to their root at once (their initial weights are dropped).
        """
        if self.state != list(range(self.num_blocks)) or self.frozen:
            raise RuntimeError("LayerTying.initialize() must be called once, on an untied model")
        state = validate_state(state, self.num_blocks)
        frozen = set(int(f) for f in frozen)
        if any(not 0 < f < self.num_blocks for f in frozen):
            raise ConfigError(
                f"frozen blocks {sorted(frozen)} out of range: block 0 always trains, the last is "
                f"{self.num_blocks - 1}"
            )
        for i, root in enumerate(state):
            if i not in frozen and root in frozen:
                raise ConfigError(f"block {i} cannot be tied to block {root}, which is frozen")
        own = self._root_params
        self.state, self.frozen = state, frozen
        self._frozen_params = {i: own[i] for i in frozen}
        self._root_params = {i: own[i] for i in set(state) if i not in frozen}
        for i in range(self.num_blocks):
            for p in own[i]:
                p.requires_grad_(i not in frozen)
        self._bind_all()

    # ----------------------------------------------------------------- decisions
    def apply(self, new_state: Sequence[int]) -> RegroupPlan:
        """Move to ``new_state`` with snapshot semantics; see the module docstring."""
        new_state = validate_state(new_state, self.num_blocks)
        old_state, frozen = self.state, self.frozen
        tr = transition(old_state, new_state, frozen)
        plan = RegroupPlan(tr, list(old_state), list(new_state))
        if not tr.changed:
            return plan

        new_roots: dict[int, list[nn.Parameter]] = {}
        clone_dst: list[torch.Tensor] = []
        clone_src: list[torch.Tensor] = []
        for r in sorted(set(new_state)):
            if r in frozen:
                # A frozen block starts training from the weights it was computing with.
                params = self._frozen_params[r]
                for p in params:
                    p.requires_grad_(True)
                plan.created.extend((p, None) for p in params)
            elif old_state[r] == r:
                params = self._root_params[r]
            else:
                # Untie: a fresh tensor holding what r computed with (its old root's weights).
                source = self._root_params[old_state[r]]
                params = [nn.Parameter(torch.empty_like(p), requires_grad=True) for p in source]
                clone_dst.extend(p.data for p in params)
                clone_src.extend(p.data for p in source)
                plan.created.extend(zip(params, source))
            new_roots[r] = params
        # One fused copy for every untied block, before anything is re-bound (snapshot semantics).
        multi_tensor_copy_(clone_dst, clone_src)

        kept = {id(p) for params in new_roots.values() for p in params}
        for r, params in self._root_params.items():
            if old_state[r] == r and r not in frozen:
                plan.removed.extend(p for p in params if id(p) not in kept)
        self._root_params = new_roots
        self.state = list(new_state)
        self.frozen = set()
        self._frozen_params = {}
        self._bind_all()
        return plan

    # ----------------------------------------------------------------- bookkeeping
    def untied_parameter_count(self) -> int:
        """Trainable elements the same model would have with every block independent."""
        in_blocks = {id(p) for params in (*self._root_params.values(), *self._frozen_params.values())
                     for p in params}
        outside = sum(p.numel() for p in unique_parameters(self.model) if id(p) not in in_blocks)
        per_block = sum(p.numel() for p in next(iter(self._root_params.values())))
        return outside + self.num_blocks * per_block

    def num_independent(self) -> int:
        return num_independent(self.state)

    def state_dict(self) -> dict:
        return {"state": list(self.state), "frozen": sorted(self.frozen), "mode": self.mode,
                "block_path": self.block_path}

    def load_state_dict(self, sd: dict) -> None:
        """Restore a saved tie structure on a freshly built model (weights are loaded afterwards)."""
        if sd.get("mode", self.mode) != self.mode:
            raise ConfigError(f"checkpoint was trained with tie mode {sd['mode']!r}, this run uses {self.mode!r}")
        self.initialize(sd["state"], sd.get("frozen", ()))


def unique_parameters(model: nn.Module, trainable_only: bool = False) -> list[nn.Parameter]:
    """Each distinct parameter tensor once, in module order (``named_parameters`` de-duplicates)."""
    return [p for p in model.parameters() if p.requires_grad or not trainable_only]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` element counts, a shared tensor counted once."""
    params = unique_parameters(model)
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
