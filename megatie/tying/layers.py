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

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from megatie.errors import ConfigError
from megatie.kernels import multi_tensor_copy_
from megatie.tying.blocks import KNOWN_BLOCK_PATHS, find_blocks  # noqa: F401 (re-exported)
# Parameter bookkeeping, ZeRO-3-aware, is its own module; re-exported where callers have always found it.
from megatie.tying.params import count_parameters, local_part, numel, unique_parameters  # noqa: F401

# The mode names are defined torch-free (for the launcher's parser) and re-exported here.
from megatie.tying.options import KEEP_UNIQUE, TIE_MODES, TIE_PARTS, Relax, parse_relax
from megatie.tying.relax import (
    add_delta,
    bind_delta,
    effective_weight,
    new_delta,
    private_slots,
    supports_delta,
)
from megatie.tying.tie_map import (
    Transition,
    num_independent,
    transition,
    validate_state,
)


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
    """Binds the blocks of ``model`` to a tying state; see the module docstring.

    ``relax``, ``parts`` and ``keep_unique`` relax what a tie shares (``megatie.tying.relax``): private
    slots stay per position, members get low-rank deltas, and kept-unique blocks (the first and/or the
    last) stay out of the tied range altogether - block i of the state is model block ``offset + i``.
    """

    def __init__(self, model: nn.Module, mode: str = "shared", block_path: str | None = None,
                 relax: Relax | str | None = None, parts: str = "all", keep_unique: str = "none", seed: int = 0):
        if mode not in TIE_MODES:
            raise ConfigError(f"unknown tie mode {mode!r}; choose one of {', '.join(TIE_MODES)}")
        self.relax = relax if isinstance(relax, Relax) else _parse(relax)
        if parts not in TIE_PARTS or keep_unique not in KEEP_UNIQUE:
            raise ConfigError(f"unknown tie parts {parts!r} or kept-unique blocks {keep_unique!r}")
        if (self.relax.any or parts != "all") and mode != "shared":
            raise ConfigError("relaxed ties and tied parts need tie mode 'shared'")
        self.model, self.mode, self.parts, self.keep_unique, self.seed = model, mode, parts, keep_unique, seed
        self.block_path, all_blocks = find_blocks(model, block_path)
        self.offset = 1 if keep_unique in ("first", "both") else 0
        end = len(all_blocks) - (1 if keep_unique in ("last", "both") else 0)
        self.blocks = all_blocks[self.offset:end]
        self.num_blocks = len(self.blocks)
        if self.num_blocks < 1:
            raise ConfigError(f"--tie-keep-unique {keep_unique} leaves no block of {len(all_blocks)} to tie")
        self.slots, shapes = self._discover_slots()
        self.private = private_slots(self.slots, shapes, self.relax, parts)
        self.delta_slots = [k for k, (_, name) in enumerate(self.slots)
                            if (self.relax.rank or self.relax.auto) and not self.private[k]
                            and len(shapes[k]) == 2 and supports_delta(self._slot_module(0, k), name)]
        self.state: list[int] = list(range(self.num_blocks))
        self.frozen: set[int] = set()
        # Each block's own parameters per slot. Roots and private slots compute with these; members
        # compute with their root's (plus a delta) and frozen blocks with their initial ones.
        self._root_params: dict[int, list[nn.Parameter]] = {
            i: [getattr(self._slot_module(i, k), n) for k, (_, n) in enumerate(self.slots)]
            for i in range(self.num_blocks)
        }
        self._own = {i: list(params) for i, params in self._root_params.items()}  # private slots' tensors
        self._frozen_params: dict[int, list[nn.Parameter]] = {}
        self._deltas: dict[int, dict[int, tuple[nn.Parameter, nn.Parameter]]] = {}  # member -> slot -> (U, V)
        self._ties_made = 0  # numbers the zero deltas' random streams
        # Where parameters exist only as per-rank partitions (ZeRO-3), the engine sets this: an untied
        # block's new tensor is then made from its source's partition alone, and a new delta reads whole
        # tensors one slot at a time (engines/zero3.PartitionedTensors).
        self.partitioned = None
        for i in range(self.num_blocks):
            for k in self.delta_slots:
                self._slot_module(i, k).register_forward_hook(add_delta)
        if mode == "frozen-replica":
            for i, block in enumerate(self.blocks):
                block.register_forward_pre_hook(self._make_refresh_hook(i))

    # ----------------------------------------------------------------- structure
    def _discover_slots(self) -> tuple[list[tuple[str, str]], list[tuple]]:
        reference = None
        for i, block in enumerate(self.blocks):
            shapes = [
                (name, tuple(p.shape), p.dtype) for name, p in block.named_parameters(remove_duplicate=False)
            ]
            if reference is None:
                reference = shapes
            elif shapes != reference:
                raise ConfigError(
                    f"block {i + self.offset} of {self.block_path!r} differs from block {self.offset} in its "
                    "parameters; only identical blocks can be tied"
                )
        if not reference:
            raise ConfigError(f"the blocks under {self.block_path!r} have no parameters to tie")
        slots = [tuple(name.rsplit(".", 1)) if "." in name else ("", name) for name, _, _ in reference]
        return slots, [shape for _, shape, _ in reference]

    def _slot_module(self, block: int, slot: int) -> nn.Module:
        prefix = self.slots[slot][0]
        return self.blocks[block].get_submodule(prefix) if prefix else self.blocks[block]

    def param_name(self, block: int, slot: int) -> str:
        """The model's name for slot ``slot`` of block ``block`` (of the tied range)."""
        prefix, name = self.slots[slot]
        return ".".join(p for p in (self.block_path, str(block + self.offset), prefix, name) if p)

    def block_tensors(self, block: int) -> list[torch.Tensor]:
        """The tensors block ``block`` holds in its slots (a member's delta comes on top), in slot order."""
        if block in self.frozen:
            return list(self._frozen_params[block])
        shared = self._root_params[self.state[block]]
        return [self._own[block][k] if private else shared[k] for k, private in enumerate(self.private)]

    def effective_tensors(self, block: int) -> list[torch.Tensor]:
        """What block ``block`` computes with, materialised (root + delta): what an untied export holds."""
        tensors, deltas = self.block_tensors(block), self._deltas.get(block, {})
        return [effective_weight(t, *deltas.get(k, (None, None))) for k, t in enumerate(tensors)]

    def root_parameters(self, root: int) -> list[nn.Parameter]:
        return list(self._root_params[root])

    def _bind_all(self) -> None:
        for i in range(self.num_blocks):
            tensors = self.block_tensors(i)
            if i not in self.frozen and self.state[i] != i and self.mode == "frozen-replica":
                tensors = [p.detach() for p in tensors]
            for k, (_, name) in enumerate(self.slots):
                _bind(self._slot_module(i, k), name, tensors[k])
            for k in self.delta_slots:
                bind_delta(self._slot_module(i, k), self._deltas.get(i, {}).get(k))

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
        them; members of ``state`` are tied to their root at once (their initial weights are dropped,
        their private slots kept, their deltas start at zero).
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
        self._deltas = {i: self._new_deltas(i, False, self._root_params[state[i]]) for i in range(self.num_blocks)
                        if state[i] != i and i not in frozen and self.delta_slots}
        self._bind_all()

    def _new_deltas(self, block: int, trained: bool, root: list[torch.Tensor]) -> dict[int, tuple]:
        """Block ``block``'s deltas against its new root's tensors ``root``, from what it computed with before
        where it trained (``trained``; else zero deltas), read before anything is re-bound. One slot at a
        time: where tensors are partitioned (ZeRO-3) that slot's tensors are gathered whole for it, and the
        new delta is partitioned."""
        if self.relax.auto:
            raise RuntimeError("--tie-relax lora:auto is resolved (fix_delta_rank) before any tie is made")
        self._ties_made += 1
        tensors, deltas, out = self.block_tensors(block), self._deltas.get(block, {}), {}
        for k in self.delta_slots:
            reading = [tensors[k], *deltas.get(k, ()), root[k]]
            with nullcontext() if self.partitioned is None else self.partitioned.whole(reading):
                own = effective_weight(tensors[k], *deltas.get(k, (None, None))) if trained else None
                out[k] = new_delta(own, root[k], self.relax.rank, self.seed, (block, k, self._ties_made))
            if self.partitioned is not None:
                self.partitioned.adopt(out[k])
        return out

    # ----------------------------------------------------------------- decisions
    def apply(self, new_state: Sequence[int]) -> RegroupPlan:
        """Move to ``new_state`` with snapshot semantics; see the module docstring."""
        new_state = validate_state(new_state, self.num_blocks)
        old_state, frozen = self.state, self.frozen
        tr = transition(old_state, new_state, frozen)
        plan = RegroupPlan(tr, list(old_state), list(new_state))
        if not tr.changed:
            return plan
        tied = [k for k, private in enumerate(self.private) if not private]
        for i in frozen:  # a frozen block starts training its private slots with its first decision
            for k in range(len(self.slots)):
                if self.private[k]:
                    self._own[i][k].requires_grad_(True)
                    plan.created.append((self._own[i][k], None))
        new_roots: dict[int, list[nn.Parameter]] = {}
        clone_dst: list[torch.Tensor] = []
        clone_src: list[torch.Tensor] = []
        for r in sorted(set(new_state)):
            if r in frozen:
                # A frozen block starts training from the weights it was computing with.
                params = self._frozen_params[r]
                for k in tied:
                    params[k].requires_grad_(True)
                    plan.created.append((params[k], None))
            elif old_state[r] == r:
                params = self._root_params[r]
            else:
                # Untie: fresh tensors holding what r computed with (its old root's weights, its delta folded in).
                source, deltas = self._root_params[old_state[r]], self._deltas.get(r, {})
                params = list(self._own[r])
                for k in tied:
                    if self.partitioned is not None:
                        params[k] = self.partitioned.clone(source[k], deltas.get(k))
                        plan.created.append((params[k], source[k]))
                        continue
                    params[k] = nn.Parameter(torch.empty_like(source[k]), requires_grad=True)
                    plan.created.append((params[k], source[k]))
                    if k in deltas:
                        params[k].data.copy_(effective_weight(source[k], *deltas[k]))
                    else:
                        clone_dst.append(params[k].data)
                        clone_src.append(source[k].data)
            new_roots[r] = params
        # One fused copy for every untied block, before anything is re-bound (snapshot semantics).
        multi_tensor_copy_(clone_dst, clone_src)
        new_deltas = self._deltas_after(old_state, new_state, frozen, tr, new_roots, plan)

        kept = {id(p) for params in new_roots.values() for p in params}
        for r, params in self._root_params.items():
            if old_state[r] == r and r not in frozen:
                plan.removed.extend(params[k] for k in tied if id(params[k]) not in kept)
        self._root_params = new_roots
        self._deltas = new_deltas
        self.state = list(new_state)
        self.frozen = set()
        self._frozen_params = {}
        self._bind_all()
        return plan

    def _deltas_after(self, old_state, new_state, frozen, tr, new_roots, plan) -> dict[int, dict[int, tuple]]:
        """Members that kept their root keep their deltas; a newly tied or re-tied member gets new ones from
        what it computed with before (read before anything is re-bound)."""
        out: dict[int, dict[int, tuple]] = {}
        if not self.delta_slots:
            return out
        changed = set(tr.changed)
        for i, root in enumerate(new_state):
            if root == i:
                continue
            if i not in changed and i in self._deltas:
                out[i] = self._deltas[i]
                continue
            out[i] = self._new_deltas(i, i not in frozen, new_roots[root])
            plan.created.extend((p, None) for pair in out[i].values() for p in pair)
        for i, deltas in self._deltas.items():
            if out.get(i) is not deltas:
                plan.removed.extend(p for pair in deltas.values() for p in pair)
        return out

    # ----------------------------------------------------------------- bookkeeping
    def _block_ids(self) -> set[int]:
        groups = (*self._root_params.values(), *self._frozen_params.values(), *self._own.values())
        deltas = (p for pairs in self._deltas.values() for pair in pairs.values() for p in pair)
        return {id(p) for params in groups for p in params} | {id(p) for p in deltas}

    def untied_parameter_count(self) -> int:
        """Trainable elements the same model would have with every block independent (kept-unique blocks
        and everything else outside the tied range counted once, deltas not at all)."""
        in_blocks = self._block_ids()
        outside = sum(numel(p) for p in unique_parameters(self.model) if id(p) not in in_blocks)
        return outside + self.num_blocks * self.block_numel()

    def block_numel(self) -> int:
        """Elements of one block: what a root costs."""
        return sum(numel(t) for t in self.block_tensors(0))

    def member_numel(self) -> int:
        """Elements a member costs: its private slots and its deltas."""
        tensors = self.block_tensors(0)
        private = sum(numel(t) for t, own in zip(tensors, self.private) if own)
        return private + sum(self.relax.rank * sum(tensors[k].shape) for k in self.delta_slots)

    def delta_numel_per_rank(self) -> int:
        """Elements one rank of a member's deltas costs (``U`` and ``V`` on every delta slot)."""
        tensors = self.block_tensors(0)
        return sum(sum(tensors[k].shape) for k in self.delta_slots)

    def full_delta_rank(self) -> int:
        """The rank past which a delta can represent nothing more (the smallest side of a delta slot)."""
        tensors = self.block_tensors(0)
        return min((min(tensors[k].shape) for k in self.delta_slots), default=0)

    def fix_delta_rank(self, rank: int) -> None:
        """Resolve ``lora:auto`` to rank ``rank`` (0: no deltas), before any tie is made."""
        if not self.relax.auto or self._deltas or self._ties_made:
            raise RuntimeError("fix_delta_rank resolves lora:auto once, before any tie is made")
        self.relax = self.relax.with_rank(rank)
        if rank == 0:
            self.delta_slots = []

    def num_independent(self) -> int:
        return num_independent(self.state)

    def state_dict(self) -> dict:
        return {"state": list(self.state), "frozen": sorted(self.frozen), "mode": self.mode,
                "block_path": self.block_path, "relax": str(self.relax), "parts": self.parts,
                "keep_unique": self.keep_unique, "ties_made": self._ties_made}

    def load_state_dict(self, sd: dict) -> None:
        """Restore a saved tie structure on a freshly built model (weights are loaded afterwards)."""
        if sd.get("mode", self.mode) != self.mode:
            raise ConfigError(f"checkpoint was trained with tie mode {sd['mode']!r}, this run uses {self.mode!r}")
        saved = (str(_parse(sd.get("relax"))), sd.get("parts", "all"), sd.get("keep_unique", "none"))
        if saved != (str(self.relax), self.parts, self.keep_unique):
            raise ConfigError(f"checkpoint ties with relax/parts/kept-unique {saved}, this run with "
                              f"{(str(self.relax), self.parts, self.keep_unique)}")
        self.initialize(sd["state"], sd.get("frozen", ()))
        self._ties_made = int(sd.get("ties_made", self._ties_made))


def _parse(relax: str | None) -> Relax:
    try:
        return parse_relax(relax)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def tying_for(model: nn.Module, block_path: str | None, settings: Mapping) -> LayerTying:
    """The tying a run with ``settings`` (flat names: a config's, a checkpoint's) trains with."""
    return LayerTying(model, settings.get("tie_mode", "shared"), block_path, relax=settings.get("tie_relax"),
                      parts=settings.get("tie_parts", "all"), keep_unique=settings.get("tie_keep_unique", "none"),
                      seed=int(settings.get("seed", 0)))
