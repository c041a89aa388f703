"""Policies and the controller's schedule."""

import json

import pytest
import torch

from helpers import VOCAB, lm_loss, tiny_model
from megatie.tying.controller import TieController
from megatie.errors import ConfigError
from megatie.tying.policies import POLICIES, cycle_rev_state, cycle_state, sequence_state
from megatie.tying.registry import POLICY_REGISTRY, build_policy, load_reference_run
from megatie.tying.tie_map import num_independent, validate_state
from megatie.tying.layers import LayerTying, count_parameters


def test_static_patterns():
    assert cycle_state(6) == [0, 1, 2, 0, 1, 2]
    assert cycle_rev_state(6) == [0, 1, 2, 2, 1, 0]
    assert sequence_state(6) == [0, 0, 2, 2, 4, 4]
    for L in range(1, 13):
        for f in (cycle_state, cycle_rev_state, sequence_state):
            validate_state(f(L), L)
    assert num_independent(cycle_state(12)) == 6


def make_controller(policy_name, L=6, k=3, **kw):
    model = tiny_model("gpt2", n_layer=L)
    tying = LayerTying(model)
    policy = build_policy(policy_name, L, seed=0, **kw)
    batch = torch.randint(0, VOCAB, (2, 8))
    ctl = TieController(tying, policy, tie_every=k, reward="neg-loss",
                        reward_loss=lambda: float(lm_loss(model, batch)))
    ctl.setup()
    return ctl, model, tying


def test_schedule_first_decision_after_k_then_every_k():
    ctl, _, _ = make_controller("qlearning", k=4)
    decided = [s for s in range(0, 25) if ctl.maybe_decide(s) is not None]
    assert decided == [4, 8, 12, 16, 20, 24]
    assert [r["step"] for r in ctl.history] == decided


def test_qlearning_records_everything():
    ctl, model, tying = make_controller("qlearning")
    assert tying.frozen == set(range(1, 6))
    rec = ctl.decide(3)
    for key in ("step", "action", "state", "tied", "untied", "retied", "eps", "reward", "n_independent",
                "trainable_params", "q_pred", "td_target", "td_error", "structure_changed",
                "distinct_greedy_states", "explored"):
        assert key in rec, key
    assert rec["state"] == tying.state and rec["trainable_params"] == count_parameters(model)[0]
    assert rec["tied"] + rec["untied"] == 5  # every frozen block changes at the first decision
    assert rec["eps"] == pytest.approx(0.95)
    json.dumps(rec)


def test_static_policies_never_decide():
    for name in ("conventional", "cycle", "cycle-rev", "sequence"):
        ctl, model, tying = make_controller(name)
        assert not any(ctl.maybe_decide(s) for s in range(1, 20))
        assert not tying.frozen
    ctl, _, tying = make_controller("cycle")
    assert tying.state == cycle_state(6)


def test_replicate_only_copies_then_unties():
    ctl, model, tying = make_controller("replicate-only")
    for step in (3, 6, 9):
        rec = ctl.decide(step)
        assert tying.state == list(range(6))
        assert rec["n_independent"] == 6
    policy_states = [r.get("policy_state", r["state"]) for r in ctl.history]
    assert any(s != list(range(6)) for s in policy_states)


def test_all_trainable_starts_unfrozen():
    ctl, model, tying = make_controller("all-trainable")
    assert tying.frozen == set() and tying.state == list(range(6))
    assert ctl.policy.agent.eps == 1.0


def write_reference(tmp_path, states, final_state, indep):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"event": "train", "step": 1, "loss": 3.0}) + "\n")
        for i, s in enumerate(states):
            f.write(json.dumps({"event": "decision", "step": 3 * (i + 1), "state": s}) + "\n")
    (tmp_path / "summary.json").write_text(json.dumps({"final_state": final_state,
                                                       "final_independent_layers": indep}))
    return load_reference_run(str(tmp_path))


def test_replay_and_static_from_reference(tmp_path):
    states = [[0, 1, 1, 0, 4, 4], [0, 0, 2, 2, 0, 5], [0, 1, 2, 3, 1, 1]]
    ref = write_reference(tmp_path, states, states[-1], 4)
    ctl, _, tying = make_controller("replay", reference=ref)
    got = [ctl.decide(3 * (i + 1))["state"] for i in range(4)]
    assert got == states + [states[-1]]
    ctl, _, tying = make_controller("static", reference=ref)
    assert tying.state == states[-1] and not ctl.policy.decides
    ctl, _, _ = make_controller("replay-permuted", reference=ref)
    permuted = [ctl.decide(3 * (i + 1))["state"] for i in range(3)]
    assert [num_independent(s) for s in permuted] == [num_independent(s) for s in states]
    assert permuted != states


def test_policy_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown tie policy"):
        build_policy("nope", 4)
    with pytest.raises(ConfigError, match="needs --reference-run"):
        build_policy("replay", 4)
    with pytest.raises(ConfigError, match="not a finished run"):
        load_reference_run(str(tmp_path))
    assert set(POLICIES) >= {"conventional", "qlearning", "cycle", "cycle-rev", "sequence", "replay",
                             "replay-permuted", "static", "vanilla", "replicate-only", "all-trainable"}


def test_the_registry_builds_every_policy_the_flags_name():
    """Every name --tie-policy accepts has a builder, and every builder a name (described once)."""
    assert set(POLICY_REGISTRY) == set(POLICIES)
    reference = {"summary": {"final_state": [0, 0, 2, 2]}, "states": [[0, 0, 2, 2], [0, 1, 2, 3]]}
    for name in POLICIES:
        policy = build_policy(name, 4, reference=reference, total_steps=60, tie_every=15)
        assert policy.name == name
        assert validate_state(policy.initial_state(), 4) == policy.initial_state()


def test_no_policy_name_is_branched_on_outside_tying():
    """Behaviour by policy lives in megatie.tying (the registry and PolicyInfo), not in the trainer or
    the config: no other module of the package compares a setting with a policy's name."""
    import pathlib
    import re

    package = pathlib.Path(__file__).resolve().parents[1] / "megatie"
    names = "|".join(re.escape(n) for n in POLICIES)
    pattern = re.compile(rf"tie_policy\s*(==|!=|in|not in)\s*[(\[{{]?\s*[\"']({names})[\"']")
    offenders = [str(p.relative_to(package)) for p in package.rglob("*.py")
                 if p.parent.name != "tying" and pattern.search(p.read_text())]
    assert offenders == []


def test_controller_state_round_trip():
    ctl, _, _ = make_controller("qlearning")
    for s in (3, 6, 9):
        ctl.decide(s)
    sd = ctl.state_dict()
    other, _, tying = make_controller("qlearning")
    other.tying = LayerTying(tiny_model("gpt2", n_layer=6))
    other.load_state_dict(sd)
    assert other.tying.state == ctl.tying.state and other.history == ctl.history
    assert other.policy.agent.eps == ctl.policy.agent.eps
    assert other.decide(12)["action"] == ctl.decide(12)["action"]
