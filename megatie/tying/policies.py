"""Tying policies: who decides the state, and how (docs/method.md; the paper's Table 4 ablations).

Every policy answers the same questions, so the controller and the launcher treat them alike:
- ``initial_state()`` and ``frozen_start``: the structure before the first decision;
- ``decides``: whether decisions are scheduled at all (static patterns never change);
- ``ties``: whether a decision ties blocks or only replicates weights (ablation v);
- ``propose(state, index)``: the next action and state; ``observe(...)``: learn from a reward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatie.errors import ConfigError
from megatie.tying.agent import AgentConfig, QLearningAgent
from megatie.tying.gradient_probe import cosine, group_conflict

# Policy names and descriptions are defined torch-free (for the launcher's parser) and re-exported here.
from megatie.tying.options import GROW_LAYOUTS, POLICIES  # noqa: F401
from megatie.tying.tie_map import (
    action_for_state,
    all_tied_state,
    groups,
    identity_state,
    num_independent,
    permute_state,
    state_from_action,
    validate_state,
)


@dataclass
class Proposal:
    action: list[int]
    state: list[int]
    explored: bool = False
    info: dict = field(default_factory=dict)  # what the decision saw, for the run's log


class TyingPolicy:
    name = "base"
    frozen_start = False
    decides = True
    ties = True
    learns = False

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks

    def initial_state(self) -> list[int]:
        return identity_state(self.num_blocks)

    def initial_frozen(self) -> list[int]:
        return list(range(1, self.num_blocks)) if self.frozen_start else []

    def propose(self, state: list[int], index: int) -> Proposal:
        raise NotImplementedError

    def observe(self, state, action, reward: float, next_state) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, sd: dict) -> None:
        pass


class StaticPolicy(TyingPolicy):
    """A fixed tie map from the first step on; no decisions, no frozen phase."""

    decides = False

    def __init__(self, num_blocks: int, state: list[int], name: str = "static"):
        super().__init__(num_blocks)
        self.state = validate_state(state, num_blocks)
        self.name = name

    def initial_state(self) -> list[int]:
        return list(self.state)


def cycle_state(num_blocks: int) -> list[int]:
    """Block L/2 + i tied to block i."""
    half = num_blocks // 2 + num_blocks % 2
    return [i if i < half else i - half for i in range(num_blocks)]


def cycle_rev_state(num_blocks: int) -> list[int]:
    """Block i >= L/2 tied to block L-1-i."""
    half = num_blocks // 2 + num_blocks % 2
    return [i if i < half else num_blocks - 1 - i for i in range(num_blocks)]


def sequence_state(num_blocks: int) -> list[int]:
    """Block 2m+1 tied to block 2m."""
    return [i - (i % 2) for i in range(num_blocks)]


class QLearningPolicy(TyingPolicy):
    """The paper's agent: eps-greedy Q-learning over whole action vectors."""

    name = "qlearning"
    frozen_start = True
    learns = True

    def __init__(self, num_blocks: int, agent_config: AgentConfig | None = None, seed: int = 0,
                 frozen_start: bool = True, ties: bool = True, name: str = "qlearning"):
        super().__init__(num_blocks)
        self.agent = QLearningAgent(num_blocks, agent_config, seed=seed)
        self.frozen_start, self.ties, self.name = frozen_start, ties, name

    def initial_state(self) -> list[int]:
        # The paper starts from the all-zero state vector while blocks 1..L-1 sit frozen.
        return all_tied_state(self.num_blocks) if self.frozen_start else identity_state(self.num_blocks)

    def propose(self, state, index):
        action, explored = self.agent.act(state)
        return Proposal(action, state_from_action(action), explored)

    def observe(self, state, action, reward, next_state):
        return self.agent.update(state, action, reward, next_state)

    def state_dict(self):
        return {"agent": self.agent.state_dict()}

    def load_state_dict(self, sd):
        self.agent.load_state_dict(sd["agent"])


def split_order(num_blocks: int) -> list[int]:
    """The order in which ``grow`` makes blocks independent: always split the longest run of blocks
    sharing one root in its middle, so g roots cut the stack into near-equal contiguous chunks."""
    roots = [0]
    while len(roots) < num_blocks:
        bounds = sorted(roots) + [num_blocks]
        start, end = max(zip(bounds, bounds[1:]), key=lambda c: (c[1] - c[0], -c[0]))
        roots.append(start + (end - start) // 2)
    return roots


def contiguous_state(num_blocks: int, roots) -> list[int]:
    """Every block tied to the nearest root at or below it."""
    roots, state, current = set(roots) | {0}, [], 0
    for i in range(num_blocks):
        current = i if i in roots else current
        state.append(current)
    return state


def cyclic_state(num_blocks: int, groups: int) -> list[int]:
    """Block i shares the weights of block i mod g (the ``cycle`` pattern with g groups)."""
    return [i % groups for i in range(num_blocks)]


def divisor_chain(final: int) -> list[int]:
    """1 = c0 | c1 | ... | final, each the smallest multiple of the previous that divides ``final``.

    Going from g to g' groups of the cyclic layout is a pure split (nothing is re-tied to a block it
    did not compute with) exactly when g divides g'."""
    chain = [1]
    while chain[-1] < final:
        c = chain[-1]
        chain.append(next(m for m in range(2 * c, final + 1, c) if final % m == 0))
    return chain


class GrowPolicy(TyingPolicy):
    """A fixed schedule, no learning: every block shares block 0's weights (an ALBERT-like stack,
    all of it trained) until a fraction ``start`` of training, then the stack is split, in equal
    stages, into ``final`` groups.

    ``contiguous`` layout: one more root per stage, each block tied to the nearest root below it
    (stages 1, 2, ..., final). ``cyclic``: block i tied to block i mod g, g along a divisor chain
    (e.g. 1, 2, 4, 12). Each split is function-preserving: the new root and the blocks that move to
    it already computed with the old root's weights, and the new root inherits them together with
    their optimizer state. Mean trainable parameters are averaged over steps, so late splits are
    cheap: contiguous mean roots ~= start + (1 - start) * (final + 1) / 2.
    """

    name = "grow"

    def __init__(self, num_blocks: int, total_steps: int, tie_every: int, start: float = 0.5,
                 final: int | None = None, layout: str = "contiguous"):
        super().__init__(num_blocks)
        final = 4 if final is None else final
        if not 0 <= start < 1:
            raise ConfigError(f"--grow-start must be in [0, 1), got {start}")
        if not 1 <= final <= num_blocks:
            raise ConfigError(f"--grow-final must be in 1..{num_blocks}, got {final}")
        if total_steps < 1 or tie_every < 1:
            raise ConfigError("grow needs a positive number of steps and --tie-every")
        if layout not in GROW_LAYOUTS:
            raise ConfigError(f"unknown --grow-layout {layout!r}; choose one of {', '.join(GROW_LAYOUTS)}")
        self.total_steps, self.tie_every, self.start, self.final = total_steps, tie_every, start, final
        self.layout = layout
        self.order = split_order(num_blocks)
        self.chain = list(range(1, final + 1)) if layout == "contiguous" else divisor_chain(final)

    def initial_state(self):
        return all_tied_state(self.num_blocks)

    def groups_at(self, step: int) -> int:
        # Progress over the decisions that happen: none at the last step, so the final split comes at
        # the last decision before it.
        last_decision = max(self.tie_every, (self.total_steps - 1) // self.tie_every * self.tie_every)
        progress = step / last_decision
        if progress < self.start:
            return 1
        n = len(self.chain)
        return self.chain[min(n - 1, int(n * (progress - self.start) / (1 - self.start)))]

    def state_for(self, groups: int) -> list[int]:
        if self.layout == "cyclic":
            return cyclic_state(self.num_blocks, groups)
        return contiguous_state(self.num_blocks, self.order[:groups])

    def propose(self, state, index):
        # Decision ``index`` happens after (index + 1) * k optimizer steps.
        s = self.state_for(self.groups_at((index + 1) * self.tie_every))
        return Proposal(action_for_state(s), s)


class ReplayPolicy(TyingPolicy):
    """Replays a recorded sequence of states (optionally under a fixed block permutation)."""

    frozen_start = True

    def __init__(self, num_blocks: int, states: list[list[int]], permutation: list[int] | None = None,
                 name: str = "replay"):
        super().__init__(num_blocks)
        if not states:
            raise ConfigError("the reference run recorded no decisions to replay")
        self.states = [validate_state(s, num_blocks) for s in states]
        if permutation is not None:
            self.states = [permute_state(s, permutation) for s in self.states]
        self.permutation = permutation
        self.name = name

    def initial_state(self):
        return all_tied_state(self.num_blocks)

    def propose(self, state, index):
        # After the recording ends, the last recorded state is kept.
        s = self.states[min(index, len(self.states) - 1)]
        return Proposal(action_for_state(s), list(s))


class SplitPolicy(TyingPolicy):
    """Adapts to the data: every block starts on block 0's weights; at each decision, while the parameter
    budget allows one more independent block, the group whose members' gradients disagree most (measured
    by ``megatie.tying.gradient_probe`` on a probe batch) is split in two.

    The split is seeded by the group's root and the member whose gradient is least aligned with the
    root's; every other member goes with whichever seed its gradient is closer to, so the gradients, not
    a rule, decide the sizes. (Forcing even halves measured worse: on the pydoc corpus, seed 1234, the
    gradients' own split reached PPL 227.2, even halves 239.7, ``alternate`` 250.7.) The moved members
    tie to the lowest of them, which inherits the root's weights and optimizer state: a split preserves
    the function, and no trained root is ever tied again. ``max_roots`` comes from ``--param-budget``.
    """

    name = "split"
    needs_gradients = True

    def __init__(self, num_blocks: int, max_roots: int):
        super().__init__(num_blocks)
        if not 1 <= max_roots <= num_blocks:
            raise ConfigError(f"the parameter budget allows {max_roots} independent blocks; it must allow "
                              f"1..{num_blocks}")
        self.max_roots = max_roots
        self.gram = None  # set by the controller before each proposal

    def initial_state(self):
        return all_tied_state(self.num_blocks)

    def can_split(self, state) -> bool:
        """Whether the budget and the structure leave a split to make (no gradients needed otherwise)."""
        return num_independent(state) < self.max_roots and any(len(m) > 1 for m in groups(state).values())

    def propose(self, state, index):
        if not self.can_split(state) or self.gram is None:
            return Proposal(action_for_state(state), list(state))
        candidates = [m for m in groups(state).values() if len(m) > 1]
        members = max(candidates, key=lambda m: group_conflict(self.gram, m))
        root = members[0]
        seed = min(members[1:], key=lambda j: cosine(self.gram, j, root))
        moved = [j for j in members[1:] if j == seed or cosine(self.gram, j, seed) > cosine(self.gram, j, root)]
        new = list(state)
        for j in moved:
            new[j] = moved[0]
        return Proposal(action_for_state(new), new, info={"split_group": members, "split_moved": moved,
                                                          "split_conflict": group_conflict(self.gram, members)})


DEFAULT_PARAM_BUDGET = 1 / 3
DEFAULT_MIN_ROOTS = 2


def roots_within_budget(budget: float | None, conventional: int, per_block: int, num_blocks: int,
                        per_member: int = 0) -> int:
    """How many independent blocks keep the trainable parameters within ``budget`` x conventional's: the
    parameters outside the blocks (embeddings, final norm) always train; each root adds one block's.

    ``None`` is the default: a third, but never fewer than two roots. Where the embeddings alone take a
    third (GPT-2's 50k-token vocabulary on 12 blocks of 768, or a tiny model with 8192 tokens), a third
    buys no block at all; two roots is what a fixed two-block cycle (``alternate``) spends. A budget the
    user sets is kept exactly, and one that cannot pay for a block is refused.

    Relaxed ties: every position that is not a root costs ``per_member`` (its private slots and deltas), so
    a root costs ``per_block - per_member`` more than a member, and the budget pays for the members first."""
    outside = conventional - num_blocks * per_block + num_blocks * per_member
    per_block -= per_member
    if budget is None:
        affordable = int((DEFAULT_PARAM_BUDGET * conventional - outside) // per_block)
        return min(num_blocks, max(DEFAULT_MIN_ROOTS, affordable))
    if not 0 < budget <= 1:
        raise ConfigError(f"--param-budget must be a fraction in (0, 1], got {budget}")
    roots = min(num_blocks, int((budget * conventional - outside) // per_block))
    if roots < 1:
        raise ConfigError(f"--param-budget {budget} cannot pay for one block: the layers outside the blocks "
                          f"alone are {outside / conventional:.2f} of conventional's trainable parameters")
    return roots


def budget_split(budget: float | None, conventional: int, per_block: int, num_blocks: int, per_member: int,
                 per_rank: int, max_rank: int) -> tuple[int, int]:
    """``split`` with ``--tie-relax lora:auto``: (independent blocks, delta rank) that keep the trainable
    parameters within ``budget`` (default: a third, kept exactly) of conventional's.

    Whole roots first, as many as the budget pays for with rank-0 members (at least one); what is left
    buys every member a delta of the largest rank it pays for (``per_rank`` elements per member per rank,
    at most ``max_rank``). The final structure is the most expensive one a run passes through: a member
    costs less than a root, because the rest after the roots is less than one more root. Where the
    embeddings alone exceed the default third, one root and no deltas is the least ``split`` can train."""
    share = DEFAULT_PARAM_BUDGET if budget is None else budget
    outside = conventional - num_blocks * per_block
    if budget is None:
        affordable = int((share * conventional - outside - num_blocks * per_member) // (per_block - per_member))
        roots = min(num_blocks, max(1, affordable))
    else:
        roots = roots_within_budget(budget, conventional, per_block, num_blocks, per_member)
    members = num_blocks - roots
    left = share * conventional - outside - roots * per_block - members * per_member
    if not members or per_rank <= 0 or left <= 0:
        return roots, 0
    return roots, min(max_rank, int(left // (members * per_rank)))


def resolve_auto_rank(tying, budget: float | None) -> int:
    """Fix ``tying``'s ``lora:auto`` to the rank ``budget`` pays for (``budget_split``); the roots it leaves."""
    roots, rank = budget_split(budget, tying.untied_parameter_count(), tying.block_numel(), tying.num_blocks,
                               tying.member_numel(), tying.delta_numel_per_rank(), tying.full_delta_rank())
    tying.fix_delta_rank(rank)
    return roots
