"""The tying choices the launcher flags accept, as plain data (no torch): building the argument parser
and validating a config import only this, so ``--help`` and a mistyped flag answer at once.

``POLICIES`` describes every policy by name: what ``--help`` shows and what a run must provide for it.
``megatie.tying.policies.POLICY_REGISTRY`` builds each (a test checks that both name the same policies);
no module outside ``megatie.tying`` branches on a policy's name.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PolicyInfo:
    help: str
    ties: bool = True               # False: every block keeps its own weights (one block is enough)
    needs_reference: bool = False   # a finished run to follow (--reference-run) unless told otherwise
    takes_budget: bool = False      # spends --param-budget (and measures gradients: shared mode only)
    sets_depth: bool = False        # decides the number of blocks itself (--vanilla-layers / the reference's)


POLICIES: dict[str, PolicyInfo] = {
    "conventional": PolicyInfo("no tying: every block trains its own weights", ties=False),
    "qlearning": PolicyInfo("the paper's Q-learning agent (frozen start, eps-greedy, TD updates), as published"),
    "vanilla": PolicyInfo("(i) conventional with as many blocks as the reference run ended with", ties=False,
                          sets_depth=True),
    "static": PolicyInfo("(ii) the reference run's final tie map (or --static-state) from the start",
                         needs_reference=True),
    "replay-permuted": PolicyInfo("(iii) the reference run's states under a fixed permutation of blocks",
                                  needs_reference=True),
    "replay": PolicyInfo("(iv) the reference run's states, replayed without Q", needs_reference=True),
    "replicate-only": PolicyInfo("(v) replicate weights at decisions but never tie"),
    "all-trainable": PolicyInfo("(vi) Q-learning with every block trainable at init (no frozen phase)"),
    "cycle": PolicyInfo("(vii) block L/2+i tied to block i"),
    "cycle-rev": PolicyInfo("(viii) block i >= L/2 tied to block L-1-i"),
    "sequence": PolicyInfo("(ix) block 2m+1 tied to block 2m"),
    "alternate": PolicyInfo("block i tied to block i mod 2 (two independent blocks)"),
    "split": PolicyInfo("the default; adapts to the data: all blocks share block 0, then, while --param-budget "
                        "allows, the group whose members' gradients disagree most is split in two at each decision",
                        takes_budget=True),
    "grow": PolicyInfo("all blocks share block 0's weights, then split into --grow-final groups (--grow-layout) "
                       "in equal stages after --grow-start of training (no learning)"),
}
DEFAULT_POLICY = "split"

GROW_LAYOUTS = ("contiguous", "cyclic")

# Q-learning agent options (see ``megatie.tying.agent``).
REWARDS = ("neg-ppl", "neg-loss", "loss-drop")
REWARD_NORMS = ("none", "running")
MOVES = ("vector", "local")


@dataclass(frozen=True)
class AgentConfig:
    """The Q-learning agent's settings: the ``agent`` section of a run's config (flags ``--agent-lr``,
    ``--gamma``, ``--eps-decay``, ``--eps-min``, ``--reward-norm``, ``--target-sync``, ``--switch-cost``,
    ``--agent-moves``, ``--keep-margin``)."""
    gamma: float = 0.99
    lr: float = 1e-3
    eps_start: float = 1.0
    eps_decay: float = 0.95
    eps_min: float = 0.1
    hidden: int = 128
    reward_norm: str = "none"
    target_sync: int = 0
    switch_cost: float = 0.0
    moves: str = "vector"
    keep_margin: float = 0.0

# How a tied member holds its root's weights (see ``megatie.tying.layers``).
TIE_MODES = ("shared", "frozen-replica")

# What a tie shares (see ``megatie.tying.relax``): the parts of a block that are tied, the blocks kept
# out of tying altogether, and what each tied position keeps of its own.
TIE_PARTS = ("all", "attention", "mlp")
KEEP_UNIQUE = ("none", "first", "last", "both")


@dataclass(frozen=True)
class Relax:
    """``--tie-relax``: ``norms`` keeps every norm parameter and bias per position while the weight matrices
    are tied; ``lora:R`` gives each tied position a rank-R delta on each tied weight matrix; ``lora:auto``
    lets ``split``'s parameter budget choose R (``megatie.tying.policies.budget_split``), resolved once the
    model is built and recorded as ``lora:R``."""
    norms: bool = False
    rank: int = 0
    auto: bool = False

    @property
    def any(self) -> bool:
        return self.norms or self.rank > 0 or self.auto

    def with_rank(self, rank: int) -> Relax:
        """``lora:auto`` resolved: the rank the budget pays for (0: no deltas)."""
        return Relax(self.norms, rank)

    def __str__(self) -> str:
        lora = ["lora:auto"] if self.auto else [f"lora:{self.rank}"] if self.rank else []
        return ",".join((["norms"] if self.norms else []) + lora) or "none"


def parse_relax(text: str | None) -> Relax:
    """``none``, ``norms``, ``lora:R``, ``lora:auto`` or ``norms`` with one of them, comma-separated; a
    ``ValueError`` naming the bad part."""
    norms, rank, auto = False, 0, False
    for item in (p.strip() for p in str(text or "none").split(",")):
        if item in ("", "none"):
            continue
        if item == "norms":
            norms = True
        elif item == "lora:auto":
            auto = True
        elif item.startswith("lora:") and item[5:].isdigit() and int(item[5:]) > 0:
            rank = int(item[5:])
        else:
            raise ValueError(f"--tie-relax: {item!r} is not one of none, norms, lora:R (R a positive integer), "
                             "lora:auto")
    if auto and rank:
        raise ValueError("--tie-relax: give lora:R or lora:auto, not both")
    return Relax(norms, rank, auto)
