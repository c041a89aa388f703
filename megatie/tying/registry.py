"""Policies by name: ``POLICY_REGISTRY`` maps every name of ``options.POLICIES`` to the function that
builds it from a ``PolicyRequest`` (what a run can tell a policy). The trainer asks the registry and the
policies' ``options.PolicyInfo``; nothing outside ``megatie.tying`` branches on a policy's name."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Callable

from megatie.errors import ConfigError
from megatie.tying.agent import AgentConfig
from megatie.tying.options import POLICIES
from megatie.tying.policies import (
    GrowPolicy,
    QLearningPolicy,
    ReplayPolicy,
    SplitPolicy,
    StaticPolicy,
    TyingPolicy,
    cycle_rev_state,
    cycle_state,
    cyclic_state,
    sequence_state,
)
from megatie.tying.tie_map import identity_state


@dataclass(frozen=True)
class PolicyRequest:
    name: str
    num_blocks: int
    seed: int = 0
    agent_config: AgentConfig | None = None
    reference: dict | None = None          # a finished run (load_reference_run)
    static_state: list[int] | None = None
    total_steps: int | None = None
    tie_every: int = 15
    grow_start: float = 0.5
    grow_final: int | None = None
    grow_layout: str = "contiguous"
    max_roots: int | None = None           # split: the independent blocks the parameter budget pays for


POLICY_REGISTRY: dict[str, Callable[[PolicyRequest], TyingPolicy]] = {}


def register(*names: str):
    def add(builder):
        for name in names:
            POLICY_REGISTRY[name] = builder
        return builder
    return add


@register("conventional", "vanilla")
def _untied(r: PolicyRequest) -> TyingPolicy:
    return StaticPolicy(r.num_blocks, identity_state(r.num_blocks), name=r.name)


@register("cycle", "cycle-rev", "sequence", "alternate")
def _pattern(r: PolicyRequest) -> TyingPolicy:
    pattern = {"cycle": cycle_state, "cycle-rev": cycle_rev_state, "sequence": sequence_state,
               "alternate": lambda n: cyclic_state(n, 2)}[r.name]
    return StaticPolicy(r.num_blocks, pattern(r.num_blocks), name=r.name)


@register("qlearning", "all-trainable", "replicate-only")
def _agent(r: PolicyRequest) -> TyingPolicy:
    # (vi) trains every block from the start; (v) replicates at decisions but never ties.
    options = {"qlearning": {}, "all-trainable": {"frozen_start": False}, "replicate-only": {"ties": False}}[r.name]
    return QLearningPolicy(r.num_blocks, r.agent_config, r.seed, name=r.name, **options)


@register("static")
def _static(r: PolicyRequest) -> TyingPolicy:
    state = r.static_state if r.static_state is not None else r.reference["summary"].get("final_state")
    if state is None:
        raise ConfigError("the reference run's summary.json has no final_state")
    return StaticPolicy(r.num_blocks, state, name="static")


@register("replay", "replay-permuted")
def _replay(r: PolicyRequest) -> TyingPolicy:
    perm = None
    if r.name == "replay-permuted":
        perm = list(range(r.num_blocks))
        random.Random(r.seed).shuffle(perm)
    return ReplayPolicy(r.num_blocks, r.reference["states"], perm, name=r.name)


@register("grow")
def _grow(r: PolicyRequest) -> TyingPolicy:
    if r.total_steps is None:
        raise ConfigError("tie policy 'grow' needs the run length (max_steps)")
    return GrowPolicy(r.num_blocks, r.total_steps, r.tie_every, r.grow_start, r.grow_final, r.grow_layout)


@register("split")
def _split(r: PolicyRequest) -> TyingPolicy:
    return SplitPolicy(r.num_blocks, r.num_blocks if r.max_roots is None else r.max_roots)


def build_policy(name: str, num_blocks: int, **request) -> TyingPolicy:
    """Build a policy by its launcher name (see ``options.POLICIES``); ``request``: ``PolicyRequest``'s fields."""
    if name not in POLICY_REGISTRY:
        raise ConfigError(f"unknown tie policy {name!r}; choose one of {', '.join(POLICIES)}")
    r = PolicyRequest(name, num_blocks, **request)
    if POLICIES[name].needs_reference and r.reference is None and not (name == "static" and r.static_state):
        raise ConfigError(f"tie policy {name!r} needs --reference-run DIR (a finished qlearning run)")
    return POLICY_REGISTRY[name](r)


def policy_depth(name: str, vanilla_layers: int | None, reference: dict | None) -> int | None:
    """The number of blocks a policy that decides it (``sets_depth``: ablation (i)) trains; else None."""
    if not POLICIES[name].sets_depth:
        return None
    layers = vanilla_layers or (reference or {}).get("summary", {}).get("final_independent_layers")
    if not layers:
        raise ConfigError(f"tie policy {name!r} needs --vanilla-layers N or --reference-run DIR")
    return int(layers)


def load_reference_run(run_dir: str) -> dict:
    """Read the decisions and summary of an earlier run (for static / replay / vanilla ablations)."""
    summary_path = os.path.join(run_dir, "summary.json")
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(summary_path) or not os.path.isfile(metrics_path):
        raise ConfigError(f"{run_dir!r} is not a finished run directory (summary.json and metrics.jsonl needed)")
    try:
        with open(summary_path, encoding="utf-8") as f:
            summary = json.load(f)
        states = []
        with open(metrics_path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    if row.get("event") == "decision":
                        states.append(row["state"])
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"cannot read reference run {run_dir!r}: {e}") from None
    return {"summary": summary, "states": states}
