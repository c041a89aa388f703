"""The tying state and its algebra (docs/method.md, "Tie state and actions"; the paper's Eq. 1).

A *state* ``s`` of length L says, for each block i, the lowest index of the group block i belongs
to: ``0 <= s[i] <= i``, ``s[i] == i`` for a group root (a block with weights of its own) and
``s[0] == 0``. Every member points straight at its root, so ``s[s[i]] == s[i]``.

An *action* ``a`` of length L says, for each block i, ``a[i] == i`` ("independent") or
``a[i] == j < i`` ("do what block j does"); Eq. 1 turns it into a state.

Everything here is plain Python on lists of ints: cheap, deterministic and identical on every rank.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Iterable, Sequence

from megatie.errors import ConfigError


def _as_int_list(vector: Iterable, what: str) -> list[int]:
    try:
        items = list(vector)
    except TypeError:
        raise ConfigError(f"{what} must be a sequence of integers, got {type(vector).__name__}") from None
    out = []
    for i, v in enumerate(items):
        # bool is an int subclass but never a meaningful block index.
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            if isinstance(v, numbers.Real) and float(v).is_integer() and not isinstance(v, bool):
                # Accept 3.0 from JSON/numpy, refuse 2.5.
                v = int(v)
            else:
                raise ConfigError(f"{what}[{i}] = {v!r} is not an integer")
        out.append(int(v))
    if not out:
        raise ConfigError(f"{what} is empty; it needs one entry per transformer block")
    return out


def validate_action(action: Iterable, num_blocks: int | None = None) -> list[int]:
    """Return ``action`` as a list of ints or raise ``ConfigError`` (a ``ValueError``)."""
    a = _as_int_list(action, "action")
    if num_blocks is not None and len(a) != num_blocks:
        raise ConfigError(f"action has {len(a)} entries but the model has {num_blocks} blocks")
    for i, ai in enumerate(a):
        if not 0 <= ai <= i:
            raise ConfigError(f"action[{i}] = {ai} is out of range: block {i} may pick 0..{i}")
    return a


def validate_state(state: Iterable, num_blocks: int | None = None) -> list[int]:
    """Return ``state`` as a list of ints or raise ``ConfigError``.

    Checks ``s[0] == 0``, ``0 <= s[i] <= i`` and that every member points at a root.
    """
    s = _as_int_list(state, "state")
    if num_blocks is not None and len(s) != num_blocks:
        raise ConfigError(f"state has {len(s)} entries but the model has {num_blocks} blocks")
    for i, si in enumerate(s):
        if not 0 <= si <= i:
            raise ConfigError(f"state[{i}] = {si} is out of range: block {i} may point at 0..{i}")
        if s[si] != si:
            raise ConfigError(
                f"state[{i}] = {si} points at block {si}, which is not a group root (state[{si}] = {s[si]})"
            )
    return s


def state_from_action(action: Sequence[int]) -> list[int]:
    """Eq. 1: ``s[i] = i if a[i] == i else s[a[i]]``, computed in increasing i."""
    a = validate_action(action)
    s: list[int] = []
    for i, ai in enumerate(a):
        s.append(i if ai == i else s[ai])
    return s


def identity_state(num_blocks: int) -> list[int]:
    """Every block independent (conventional training)."""
    _check_num_blocks(num_blocks)
    return list(range(num_blocks))


def all_tied_state(num_blocks: int) -> list[int]:
    """Every block tied to block 0 (the paper's initial state vector)."""
    _check_num_blocks(num_blocks)
    return [0] * num_blocks


def _check_num_blocks(num_blocks: int) -> None:
    if not isinstance(num_blocks, numbers.Integral) or num_blocks < 1:
        raise ConfigError(f"the number of blocks must be a positive integer, got {num_blocks!r}")


def roots(state: Sequence[int]) -> list[int]:
    """Indices of the group roots, increasing."""
    return [i for i, si in enumerate(state) if si == i]


def num_independent(state: Sequence[int]) -> int:
    return sum(1 for i, si in enumerate(state) if si == i)


def groups(state: Sequence[int]) -> dict[int, list[int]]:
    """Root -> sorted list of all blocks in its group (the root included)."""
    out: dict[int, list[int]] = {}
    for i, si in enumerate(state):
        out.setdefault(si, []).append(i)
    return out


def canonical_state(group_of: Sequence[int]) -> list[int]:
    """Turn any group labelling (block -> arbitrary label) into a state (label -> lowest member)."""
    lowest: dict[int, int] = {}
    for i, g in enumerate(group_of):
        lowest.setdefault(g, i)
    return [lowest[g] for g in group_of]


def permute_state(state: Sequence[int], perm: Sequence[int]) -> list[int]:
    """Move block i's group membership to block ``perm[i]`` and re-canonicalise.

    Used by the ablation that replays recorded states under a fixed permutation of block indices:
    the group *structure* (sizes, how many roots) is kept, which blocks share weights changes.
    """
    s = validate_state(state)
    p = _as_int_list(perm, "permutation")
    if sorted(p) != list(range(len(s))):
        raise ConfigError(f"permutation must be a rearrangement of 0..{len(s) - 1}, got {p}")
    label = [0] * len(s)
    for i, si in enumerate(s):
        label[p[i]] = si
    return canonical_state(label)


def action_for_state(state: Sequence[int]) -> list[int]:
    """The action that produces ``state`` directly (each member names its root)."""
    return list(validate_state(state))


@dataclass(frozen=True)
class Transition:
    """How a decision changed each block (the paper's Fig. 2 events).

    ``tied``: blocks that now replicate a block they did not replicate before (includes re-tied);
    ``retied``: blocks tied before and now tied to a different root;
    ``untied``: blocks that now train independently and did not before;
    ``changed``: every block whose physical tying changes (what the tying code must touch).
    """

    tied: tuple[int, ...]
    retied: tuple[int, ...]
    untied: tuple[int, ...]
    changed: tuple[int, ...]

    def counts(self) -> dict[str, int]:
        return {"tied": len(self.tied), "retied": len(self.retied), "untied": len(self.untied)}


def transition(old: Sequence[int], new: Sequence[int], frozen: Iterable[int] = ()) -> Transition:
    """Classify the change from ``old`` to ``new``; blocks in ``frozen`` always count as changed."""
    if len(old) != len(new):
        raise ConfigError(f"states of different lengths: {len(old)} and {len(new)}")
    frozen = set(frozen)
    tied, retied, untied, changed = [], [], [], []
    for i, (o, n) in enumerate(zip(old, new)):
        if o == n and i not in frozen:
            continue
        changed.append(i)
        if n == i:
            untied.append(i)
        else:
            tied.append(i)
            if o != i and i not in frozen:
                retied.append(i)
    return Transition(tuple(tied), tuple(retied), tuple(untied), tuple(changed))
