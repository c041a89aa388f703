"""The options that change the learning problem, and the grow schedule."""

import copy
import dataclasses
import math
import statistics

import pytest
import torch

from helpers import VOCAB, lm_loss, tiny_model
from megatie.tying.agent import AgentConfig, QLearningAgent, RunningStats
from megatie.config import TrainConfig
from megatie.tying.controller import TieController
from megatie.errors import ConfigError
from megatie.tying.policies import GrowPolicy, contiguous_state, split_order
from megatie.tying.registry import build_policy
from megatie.tying.tie_map import num_independent, validate_state
from megatie.tying.layers import LayerTying


def test_split_order_and_contiguous_states():
    assert split_order(12) == [0, 6, 3, 9, 1, 4, 7, 10, 2, 5, 8, 11]
    for L in range(1, 14):
        order = split_order(L)
        assert sorted(order) == list(range(L))
        for g in range(1, L + 1):
            s = validate_state(contiguous_state(L, order[:g]), L)
            assert num_independent(s) == g
    assert contiguous_state(12, [0, 6, 3, 9]) == [0, 0, 0, 3, 3, 3, 6, 6, 6, 9, 9, 9]


def test_grow_schedule_is_nested_and_cheap():
    p = GrowPolicy(12, total_steps=600, tie_every=15, start=0.5, final=4)
    assert p.initial_state() == [0] * 12 and p.initial_frozen() == [] and not p.learns
    states = [p.propose(None, d).state for d in range(40)]
    groups = [num_independent(s) for s in states]
    assert groups == sorted(groups) and groups[0] == 1 and groups[-1] == 4
    assert groups.index(2) * 15 + 15 >= 300  # nothing unties before half of training
    for a, b in zip(states, states[1:]):
        # Nested: a split only moves blocks from an old root to a new root inside its group.
        assert all(b[i] in (a[i], i) or a[b[i]] == a[i] for i in range(12))
    mean = statistics.fmean(p.groups_at(s) for s in range(1, 601))
    # The schedule spans the decisions (the last at step 585: none at the last step), then holds.
    span = 585 / 600
    assert mean == pytest.approx(span * (0.5 + 0.5 * 2.5) + (1 - span) * 4, abs=0.02)
    with pytest.raises(ConfigError):
        build_policy("grow", 12)  # needs the run length
    with pytest.raises(ConfigError):
        GrowPolicy(12, 600, 15, start=1.0)
    with pytest.raises(ConfigError):
        GrowPolicy(12, 600, 15, final=13)


def test_grow_splits_are_function_preserving():
    model = tiny_model("gpt2", n_layer=6)
    tying = LayerTying(model)
    ctl = TieController(tying, build_policy("grow", 6, total_steps=8, tie_every=1, grow_start=0.0,
                                            grow_final=6), tie_every=1)
    ctl.setup()
    batch = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        for p in tying.root_parameters(0):  # not the init: the split must preserve trained weights
            p.add_(0.01 * torch.randn_like(p))
        before = float(lm_loss(model, batch))
        for step in range(1, 9):
            rec = ctl.decide(step)
            assert float(lm_loss(model, batch)) == pytest.approx(before, rel=1e-5)
    assert rec["state"] == [0, 1, 2, 3, 4, 5]
    # 1 -> 6 roots in five splits; the last decision finds nothing left to split.
    assert rec["structure_changes"] == 5 and rec["changed_blocks"] == 0 and not rec["structure_changed"]


def test_running_stats_match_statistics():
    xs = [-3.0, 5.5, 2.25, -1.0, 8.0]
    rs = RunningStats()
    for x in xs:
        rs.add(x)
    assert rs.mean == pytest.approx(statistics.fmean(xs))
    assert rs.std == pytest.approx(statistics.stdev(xs))
    clone = RunningStats()
    clone.load_state_dict(rs.state_dict())
    assert clone.normalise(1.0) == rs.normalise(1.0)


def test_reward_norm_keeps_targets_on_the_network_scale():
    L = 6
    rewards = [-1378.0, -900.0, -450.0, -200.0, -118.0] * 4
    raw = QLearningAgent(L, AgentConfig(), seed=0)
    normed = QLearningAgent(L, AgentConfig(reward_norm="running"), seed=0)
    state, action = [0] * L, list(range(L))
    for r in rewards:
        a = raw.update(state, action, r, list(range(L)))
        b = normed.update(state, action, r, list(range(L)))
    assert abs(a["td_target"]) > 100
    assert abs(b["td_target"]) < 5 and "shaped_reward" in b and "shaped_reward" not in a


def test_switch_cost_and_target_network():
    L = 5
    agent = QLearningAgent(L, AgentConfig(switch_cost=0.5, target_sync=3, gamma=0.9), seed=1)
    s, s2 = [0, 1, 2, 3, 4], [0, 0, 2, 2, 4]
    out = agent.update(s, [0, 0, 2, 2, 4], -1.0, s2)
    assert out["shaped_reward"] == pytest.approx(-1.0 - 0.5 * 2)
    frozen = {k: v.clone() for k, v in agent.target_net.state_dict().items()}
    agent.update(s, [0, 0, 2, 2, 4], -1.0, s2)
    assert all(torch.equal(frozen[k], v) for k, v in agent.target_net.state_dict().items())
    agent.update(s, [0, 0, 2, 2, 4], -1.0, s2)  # the third update refreshes the target
    assert all(torch.equal(agent.qnet.state_dict()[k], v) for k, v in agent.target_net.state_dict().items())
    clone = QLearningAgent(L, AgentConfig(switch_cost=0.5, target_sync=3, gamma=0.9), seed=2)
    clone.load_state_dict(agent.state_dict())
    assert clone.updates == 3 and clone.greedy_action(s) == agent.greedy_action(s)
    with pytest.raises(ConfigError):
        QLearningAgent(L, AgentConfig(reward_norm="z"))


def make_delayed(seed=0, setup=True):
    model = tiny_model("gpt2", n_layer=5)
    tying = LayerTying(model)
    policy = build_policy("qlearning", 5, seed=seed,
                          agent_config=AgentConfig(reward_norm="running", target_sync=2))
    gen = torch.Generator().manual_seed(3)
    ctl = TieController(tying, policy, tie_every=2, reward="neg-loss", reward_delay=True,
                        reward_loss=lambda: float(lm_loss(model, torch.randint(0, VOCAB, (2, 8), generator=gen))))
    if setup:
        ctl.setup()
    return ctl, gen, model


def test_delayed_reward_rewards_the_previous_action_and_round_trips():
    from megatie.checkpoint.store import load_model_tensors, unique_state_dict

    ctl, gen, model = make_delayed()
    first = ctl.decide(2)
    assert "reward" not in first and "q_pred" not in first
    second = ctl.decide(4)
    assert second["rewarded_decision"] == 0 and math.isfinite(second["td_error"])
    assert second["distinct_greedy_states"] >= 0 and "structure_changed" in second
    # Deep copies: a state dict holds live tensors, as a checkpoint file would not.
    sd, gen_state = copy.deepcopy(ctl.state_dict()), gen.get_state()
    tensors = {k: v.clone() for k, v in unique_state_dict(model).items()}
    assert sd["pending"][3] == 1
    tail_a = [ctl.decide(s) for s in (6, 8, 10)]
    other, gen2, model2 = make_delayed(seed=9, setup=False)  # everything must come from the state dict
    other.load_state_dict(sd)
    load_model_tensors(model2, tensors)
    gen2.set_state(gen_state)
    tail_b = [other.decide(s) for s in (6, 8, 10)]
    for a, b in zip(tail_a, tail_b):
        assert a["state"] == b["state"] and a["reward"] == pytest.approx(b["reward"], rel=1e-5)
        assert a["q_pred"] == pytest.approx(b["q_pred"], rel=1e-5, abs=1e-6)


def test_loss_drop_rewards_each_decision_with_what_it_contributed():
    model = tiny_model("gpt2", n_layer=5)
    losses = iter([5.0, 4.5, 4.4, 4.6, 4.0])
    measured = []

    def reward_loss():
        measured.append(next(losses))
        return measured[-1]

    policy = build_policy("qlearning", 5, seed=0, agent_config=AgentConfig())
    ctl = TieController(LayerTying(model), policy, tie_every=2, reward="loss-drop", reward_loss=reward_loss)
    assert ctl.reward_delay  # a drop is measured one decision later, always
    ctl.setup()
    first = ctl.decide(2)
    assert "reward" not in first and measured == [5.0]  # the baseline is measured before the first copies
    rewards = [ctl.decide(s) for s in (4, 6, 8, 10)]
    # Decision t's reward: loss before its copies minus loss before the next decision's copies.
    assert [r["rewarded_decision"] for r in rewards] == [0, 1, 2, 3]
    assert [r["reward"] for r in rewards] == pytest.approx([0.5, 0.1, -0.2, 0.6])
    assert len(measured) == 5  # one measurement per decision
    sd = ctl.state_dict()
    assert sd["pending"][4] == 4.0


def test_config_validates_new_options():
    with pytest.raises(ConfigError):
        TrainConfig.from_flat(reward_norm="zscore").resolved()
    with pytest.raises(ConfigError):
        TrainConfig.from_flat(switch_cost=-1).resolved()
    with pytest.raises(ConfigError):
        TrainConfig.from_flat(grow_final=20).resolved()
    assert TrainConfig.from_flat(tie_policy="grow", grow_final=12).resolved().tying.grow_final == 12


def test_new_options_train_end_to_end(tmp_path):
    from megatie.trainer import Trainer

    base = dict(cache_dir=str(tmp_path / "cache"), n_layer=4, n_embd=32, n_head=2, seq_len=32, batch_size=4,
                vocab_size=512, max_steps=16, tie_every=4, eval_every=8, eval_batches=2, log_every=4,
                progress=False, seed=7)
    grow = Trainer(TrainConfig.from_flat(out_dir=str(tmp_path / "grow"), tie_policy="grow", grow_start=0.25, grow_final=4,
                               **base)).train()
    assert grow["final_independent_layers"] == 4 and grow["mean_independent_layers"] < 4
    q = Trainer(TrainConfig.from_flat(out_dir=str(tmp_path / "q"), tie_policy="qlearning", reward="neg-loss",
                            reward_norm="running", target_sync=2, switch_cost=0.1, reward_delay=True,
                            agent_moves="local", keep_margin=0.05,
                            **base)).train()
    assert q["decisions"] == 3 and math.isfinite(q["final_val_ppl"])  # steps 4, 8, 12; none at the last


def test_cyclic_grow_follows_a_divisor_chain():
    from megatie.tying.policies import cyclic_state, divisor_chain

    assert divisor_chain(12) == [1, 2, 4, 12] and divisor_chain(6) == [1, 2, 6] and divisor_chain(1) == [1]
    p = GrowPolicy(12, total_steps=600, tie_every=15, start=0.0, final=12, layout="cyclic")
    states = [p.propose(None, d).state for d in range(40)]
    assert states[0] == [0] * 12 and states[-1] == list(range(12))
    assert {tuple(s) for s in states} == {tuple(cyclic_state(12, g)) for g in (1, 2, 4, 12)}
    for a, b in zip(states, states[1:]):
        # Pure splits: a block only moves to a root that shared its old root.
        assert all(a[b[i]] == a[i] for i in range(12))
    span = 585 / 600  # the last decision comes at step 585
    assert statistics.fmean(p.groups_at(s) for s in range(1, 601)) == pytest.approx(span * 19 / 4 + (1 - span) * 12,
                                                                                   abs=0.02)
    with pytest.raises(ConfigError):
        GrowPolicy(12, 600, 15, layout="spiral")


def test_alternate_is_static_two_block_cycle():
    p = build_policy("alternate", 12)
    assert not p.decides and p.initial_frozen() == []
    assert p.initial_state() == [0, 1] * 6 and num_independent(p.initial_state()) == 2
    assert build_policy("alternate", 3).initial_state() == [0, 1, 0]


def test_local_moves_change_exactly_one_block_decision():
    from megatie.tying.tie_map import roots, state_from_action

    L = 8
    agent = QLearningAgent(L, AgentConfig(moves="local", eps_start=1.0, eps_decay=1.0, eps_min=1.0), seed=3)
    s, seen = [0] * L, set()
    for _ in range(60):
        action, explored = agent.act(s)
        assert explored
        nxt = state_from_action(action)
        # One entry changed, it names a root below the block or the block itself, and the structure moved.
        diff = [i for i in range(L) if action[i] != s[i]]
        assert len(diff) == 1 and nxt != s
        i = diff[0]
        assert action[i] == i or (action[i] < i and s[action[i]] == action[i])
        # Every other block keeps its root, except the members of a root that was re-pointed.
        assert all(nxt[j] == s[j] for j in range(L) if j != i and s[j] != i)
        seen.add(tuple(nxt))
        s = nxt
    assert len(seen) > 20  # exploration wanders; it is not stuck on a few moves
    assert roots(s) == sorted(set(s))


def test_local_greedy_takes_the_best_gain_or_keeps_within_the_margin():
    L = 5
    s = [0, 0, 2, 2, 0]
    agent = QLearningAgent(L, AgentConfig(moves="local", eps_start=0.0, eps_min=0.0), seed=0)
    with torch.no_grad():
        for p in agent.qnet.parameters():
            p.zero_()
        bias = agent.qnet.net[-1].bias
        # Block 3 (segment offset 3, entries 0..3) prefers becoming its own root by 0.5.
        bias[agent.qnet.offsets[2] + 3] = 0.5
        bias[agent.qnet.offsets[0] + 1] = 0.2  # block 1 prefers its own root by 0.2
    action, explored = agent.act(s)
    assert not explored and action == [0, 0, 2, 3, 0]
    agent.config = dataclasses.replace(agent.config, keep_margin=0.6)
    assert agent.act(s)[0] == s  # no gain clears the margin: keep the structure
    agent.config = dataclasses.replace(agent.config, keep_margin=0.3)
    assert agent.act(s)[0] == [0, 0, 2, 3, 0]
    with pytest.raises(ConfigError):
        QLearningAgent(L, AgentConfig(moves="global"))
    with pytest.raises(ConfigError):
        QLearningAgent(L, AgentConfig(keep_margin=-1))
    with pytest.raises(ConfigError):
        TrainConfig.from_flat(agent_moves="x").resolved()
