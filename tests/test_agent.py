"""The Q-learning agent (docs/method.md, "The Q-learning agent")."""

import itertools

import pytest
import torch

from megatie.tying.agent import AgentConfig, QLearningAgent, QNetwork, reward_from_loss
from megatie.errors import ConfigError
from megatie.tying.tie_map import state_from_action, validate_action


@pytest.mark.parametrize("L", [2, 3, 5, 12, 48])
def test_output_shape_and_segments(L):
    q = QNetwork(L)
    assert q.num_outputs == (L + 2) * (L - 1) // 2
    out = q([0] * L)
    assert out.shape == (q.num_outputs,)
    assert q.net[0].in_features == L - 1 and q.net[0].out_features == 128
    padded = q.padded(out)
    assert padded.shape == (L - 1, L)
    for i in range(1, L):  # block i has actions 0..i, the rest masked
        assert torch.isfinite(padded[i - 1, : i + 1]).all()
        assert torch.isinf(padded[i - 1, i + 1:]).all()


@pytest.mark.parametrize("L", [3, 4, 6])
def test_greedy_is_the_exhaustive_argmax(L):
    torch.manual_seed(L)
    q = QNetwork(L)
    for _ in range(3):
        state = state_from_action([int(torch.randint(0, i + 1, ())) for i in range(L)])
        values = q(state).detach()
        greedy = q.greedy(values)
        validate_action(greedy, L)
        best = max(itertools.product(*[range(i + 1) for i in range(L)]),
                   key=lambda a: float(q.q_of_action(values, list(a))))
        assert float(q.q_of_action(values, greedy)) == pytest.approx(float(q.q_of_action(values, list(best))))
        assert float(q.max_value(values)) == pytest.approx(float(q.q_of_action(values, greedy)), rel=1e-6)


def test_masking_never_picks_a_later_block():
    torch.manual_seed(0)
    q = QNetwork(8)
    with torch.no_grad():
        q.net[2].bias.fill_(-100.0)
        q.net[2].bias[q.padded_index[:, -1].clamp(min=0)] = 100.0  # last column: valid only for block 7
    greedy = q.greedy(q([0] * 8))
    assert all(0 <= a <= i for i, a in enumerate(greedy))


def test_epsilon_schedule_and_exploration():
    agent = QLearningAgent(6, seed=1)
    assert agent.eps == 1.0
    eps = [agent.eps]
    for _ in range(60):
        agent.update([0] * 6, [0] * 6, -1.0, [0] * 6)
        eps.append(agent.eps)
    assert eps[1] == pytest.approx(0.95)
    assert eps[10] == pytest.approx(0.95 ** 10)
    assert min(eps) == pytest.approx(0.1) and eps[-1] == pytest.approx(0.1)
    # With eps = 1 every action is a random whole vector; with eps = 0 always the greedy one.
    agent.eps = 1.0
    assert all(agent.act([0] * 6)[1] for _ in range(20))
    agent.eps = 0.0
    for _ in range(5):
        action, explored = agent.act([0] * 6)
        assert not explored and action == agent.greedy_action([0] * 6)


def test_random_actions_cover_the_range():
    agent = QLearningAgent(5, seed=3)
    seen = [set() for _ in range(5)]
    for _ in range(200):
        for i, a in enumerate(agent.random_action()):
            seen[i].add(a)
    assert seen == [set(range(i + 1)) for i in range(5)]


def test_td_update_moves_q_toward_target():
    agent = QLearningAgent(5, AgentConfig(lr=1e-2), seed=0)
    s, a, s2 = [0, 0, 0, 0, 0], [0, 1, 0, 3, 3], state_from_action([0, 1, 0, 3, 3])
    with torch.no_grad():
        before = float(agent.qnet.q_of_action(agent.qnet(s), a))
    info = agent.update(s, a, reward=-5.0, next_state=s2)
    with torch.no_grad():
        after = float(agent.qnet.q_of_action(agent.qnet(s), a))
    assert info["q_pred"] == pytest.approx(before)
    with torch.no_grad():
        expected_target = -5.0 + 0.99 * float(agent.qnet.max_value(agent.qnet(s2)))
    assert abs(after - info["td_target"]) < abs(before - info["td_target"])
    assert info["td_target"] == pytest.approx(expected_target, abs=0.5)


def test_rewards():
    assert reward_from_loss(2.0, "neg-ppl") == pytest.approx(-7.389056, rel=1e-6)
    assert reward_from_loss(2.0, "neg-loss") == -2.0
    with pytest.raises(ConfigError):
        reward_from_loss(1.0, "pos")


def test_agent_state_round_trip():
    a = QLearningAgent(4, seed=5)
    a.update([0] * 4, [0, 1, 2, 3], -3.0, [0, 1, 2, 3])
    b = QLearningAgent(4, seed=99)
    b.load_state_dict(a.state_dict())
    assert b.eps == a.eps
    assert [b.act([0] * 4) for _ in range(5)] == [a.act([0] * 4) for _ in range(5)]


def test_agent_does_not_touch_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    agent = QLearningAgent(6, seed=1)
    agent.act([0] * 6)
    assert torch.equal(torch.rand(3), expected)
