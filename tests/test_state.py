"""The tying state algebra (docs/method.md, "Tie state and actions"; the paper's Eq. 1)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from megatie.errors import ConfigError
from megatie.tying.tie_map import (
    canonical_state,
    groups,
    num_independent,
    permute_state,
    roots,
    state_from_action,
    transition,
    validate_state,
)


@st.composite
def actions(draw, max_blocks=24):
    n = draw(st.integers(1, max_blocks))
    return [draw(st.integers(0, i)) for i in range(n)]


@given(actions())
def test_state_invariants(action):
    s = state_from_action(action)
    assert len(s) == len(action)
    assert s[0] == 0
    for i, si in enumerate(s):
        assert 0 <= si <= i
        assert s[si] == si  # every member points straight at a root
        if action[i] == i:
            assert si == i
        else:
            assert si == s[action[i]]
    assert validate_state(s) == s


@given(actions())
def test_state_is_fixed_point_of_its_own_action(action):
    s = state_from_action(action)
    assert state_from_action(s) == s


@given(actions(), st.randoms())
def test_permute_keeps_group_sizes(action, rnd):
    s = state_from_action(action)
    perm = list(range(len(s)))
    rnd.shuffle(perm)
    p = permute_state(s, perm)
    validate_state(p)
    assert sorted(len(g) for g in groups(s).values()) == sorted(len(g) for g in groups(p).values())
    assert num_independent(p) == num_independent(s)
    # Blocks that shared a group still share one after moving.
    for i in range(len(s)):
        for j in range(len(s)):
            assert (s[i] == s[j]) == (p[perm[i]] == p[perm[j]])


def test_examples():
    assert state_from_action([0, 0, 1, 3]) == [0, 0, 0, 3]
    assert state_from_action([0, 1, 1, 2]) == [0, 1, 1, 1]
    assert roots([0, 1, 1, 3]) == [0, 1, 3]
    assert groups([0, 1, 1, 3]) == {0: [0], 1: [1, 2], 3: [3]}
    assert canonical_state([7, 5, 7, 5]) == [0, 1, 0, 1]


@pytest.mark.parametrize("bad, msg", [
    ([1, 0], "action\\[0\\] = 1 is out of range"),
    ([0, 2], "action\\[1\\] = 2 is out of range"),
    ([0, -1], "out of range"),
    ([0, 0.5], "not an integer"),
    ([0, "1"], "not an integer"),
    ([0, True], "not an integer"),
    ([], "empty"),
    (None, "sequence of integers"),
])
def test_invalid_actions_raise_value_error(bad, msg):
    with pytest.raises(ValueError, match=msg):
        state_from_action(bad)


def test_integral_floats_accepted():
    assert state_from_action([0.0, 1.0, 0.0]) == [0, 1, 0]


@pytest.mark.parametrize("bad", [[1], [0, 0, 1], [0, 1, 3]])
def test_invalid_states(bad):
    with pytest.raises(ConfigError):
        validate_state(bad)


def test_wrong_length():
    with pytest.raises(ValueError, match="has 3 entries but the model has 4"):
        validate_state([0, 0, 0], 4)


def test_transition_events():
    t = transition([0, 1, 1, 3], [0, 0, 2, 2])
    assert t.tied == (1, 3) and t.untied == (2,) and t.retied == () and t.changed == (1, 2, 3)
    t = transition([0, 1, 1, 1], [0, 1, 0, 1])
    assert t.tied == (2,) and t.retied == (2,) and t.untied == ()
    # Frozen blocks always count as changed, even when the state vector keeps its value.
    t = transition([0, 0, 0], [0, 0, 2], frozen=[1, 2])
    assert t.changed == (1, 2) and t.tied == (1,) and t.untied == (2,) and t.retied == ()
    assert transition([0, 1], [0, 1]).changed == ()
