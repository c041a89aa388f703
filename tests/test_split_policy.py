"""The adaptive ``split`` policy: its gradient probe measures what an untied model would receive, its
splits follow the gradients and only ever split, and its parameter budget is never exceeded."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from helpers import VOCAB, tiny_model
from megatie.config import TrainConfig
from megatie.errors import ConfigError
from megatie.tying import gradient_probe
from megatie.tying.gradient_probe import block_gradient_gram, cosine, group_conflict
from megatie.tying.policies import SplitPolicy, roots_within_budget
from megatie.tying.tie_map import groups, num_independent, validate_state
from megatie.trainer import Trainer
from megatie.tying.layers import LayerTying


def untied_gradients(model, state, inputs) -> list[torch.Tensor]:
    """The reference: an untied copy holding the tied model's weights; each block's gradient, flattened."""
    twin = copy.deepcopy(model)
    twin_tying = LayerTying(twin)  # a deep copy of a tied model keeps its aliases; re-bind them all apart
    for i, block in enumerate(twin_tying.blocks):
        for k, (prefix, name) in enumerate(twin_tying.slots):
            module = block.get_submodule(prefix) if prefix else block
            setattr(module, name, torch.nn.Parameter(twin_tying.block_tensors(i)[k].detach().clone()))
    twin.zero_grad(set_to_none=True)
    twin(**inputs).loss.backward()
    return [torch.cat([p.grad.reshape(-1) for p in block.parameters()]) for block in twin_tying.blocks]


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_probe_gives_each_block_the_gradient_an_untied_model_gives_it(kind):
    model = tiny_model(kind, n_layer=4)
    tying = LayerTying(model)
    state = [0, 0, 2, 0]
    tying.initialize(state)
    ids = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "labels": ids}
    gram = block_gradient_gram(model, tying, inputs)
    reference = torch.stack(untied_gradients(model, state, inputs)).double()
    assert torch.allclose(gram, reference @ reference.T, rtol=1e-4, atol=1e-9)
    assert gram[0, 1] != gram[0, 0]  # tied blocks get different gradients: the probe separates them
    assert all(p.grad is None for p in model.parameters())  # the probe leaves the model's gradients alone
    assert tying.state == state and model.training


def cosines(gram: torch.Tensor) -> torch.Tensor:
    norms = gram.diagonal().sqrt()
    return gram / (norms[:, None] * norms[None, :])


def test_a_large_model_is_probed_in_sketches_one_gradient_at_a_time(monkeypatch):
    """Above the memory limit each block's gradient is folded into a count sketch as autograd makes it,
    then dropped: the cosines (what split decides by) match the exact probe's, and no two probe
    gradients are ever alive together."""
    model = tiny_model("gpt2", n_layer=4)
    tying = LayerTying(model)
    tying.initialize([0, 0, 0, 3])
    ids = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(2))
    inputs = {"input_ids": ids, "labels": ids}
    exact = block_gradient_gram(model, tying, inputs)
    seen, alive_at_fold = [], []
    fold_into = gradient_probe._fold_into

    def spy(*args):
        fold = fold_into(*args)

        def counted(leaf):
            alive_at_fold.append(sum(other.grad is not None for other in seen))
            seen.append(leaf)
            fold(leaf)
        return counted

    monkeypatch.setattr(gradient_probe, "_fold_into", spy)
    per_block = sum(t.numel() for t in tying.block_tensors(0))
    sketched = block_gradient_gram(model, tying, inputs, exact_limit_bytes=0, sketch_dim=per_block // 2)
    assert len(seen) == 4 * len(tying.slots) and max(alive_at_fold) == 0
    assert not torch.equal(sketched, exact)  # it did sketch
    assert (cosines(sketched) - cosines(exact)).abs().max() < 0.05
    assert all(p.grad is None for p in model.parameters()) and model.training


def test_conflict_is_zero_for_agreeing_members_and_grows_with_disagreement():
    g = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.1]], dtype=torch.float64)
    gram = g @ g.T
    assert group_conflict(gram, [0, 1]) == pytest.approx(0.0, abs=1e-9)
    assert group_conflict(gram, [0, 1, 2]) < group_conflict(gram, [0, 1, 3])
    assert cosine(gram, 0, 3) < 0 < cosine(gram, 0, 2) + 1


def gram_of(vectors) -> torch.Tensor:
    g = torch.tensor(vectors, dtype=torch.float64)
    return g @ g.T


def test_split_takes_the_most_conflicted_group_and_moves_who_disagrees():
    policy = SplitPolicy(6, max_roots=3)
    # Blocks 0-2 agree; 3-5 pull another way, 4 and 5 together.
    policy.gram = gram_of([[1, 0], [1, 0.1], [1, -0.1], [0.2, 1], [-0.1, 1], [0, 1]])
    first = policy.propose([0] * 6, 0)
    assert first.state == [0, 0, 0, 3, 3, 3] and first.info["split_moved"] == [3, 4, 5]
    policy.gram = gram_of([[1, 0], [1, 0.1], [1, -0.1], [1, 0], [0, 1], [0.1, 1]])
    second = policy.propose(first.state, 1)
    assert second.state == [0, 0, 0, 3, 4, 4]  # group {3, 4, 5} disagreed most; 4 and 5 leave together
    third = policy.propose(second.state, 2)
    assert third.state == second.state  # three roots: the budget is spent


def test_the_gradients_decide_the_sizes_of_the_halves():
    """One dissenting block leaves alone when the rest agree with the root; those closer to it follow it."""
    policy = SplitPolicy(8, max_roots=2)
    policy.gram = gram_of([[1, 0]] * 7 + [[0, 1]])
    assert policy.propose([0] * 8, 0).state == [0] * 7 + [7]
    policy.gram = gram_of([[1, 0]] * 3 + [[1, 0.3], [0.5, 1], [1, 0.2], [0.4, 1], [0, 1]])
    assert policy.propose([0] * 8, 0).state == [0, 0, 0, 0, 4, 0, 4, 4]


def test_split_only_splits_and_never_exceeds_its_budget():
    generator = torch.Generator().manual_seed(0)
    for max_roots in (1, 2, 4, 8):
        policy, state = SplitPolicy(8, max_roots), SplitPolicy(8, max_roots).initial_state()
        for index in range(12):
            policy.gram = gram_of(torch.randn(8, 5, generator=generator).tolist())
            new = validate_state(policy.propose(state, index).state, 8)
            before = groups(state)
            # every new group lies inside an old one: a split, never a merge or a re-tie to another root
            assert all(any(set(m) <= set(old) for old in before.values()) for m in groups(new).values())
            assert num_independent(new) <= max(max_roots, num_independent(state))
            state = new
        assert num_independent(state) == max_roots


def test_budget_counts_the_layers_outside_the_blocks():
    # tiny preset: 2.92M conventional, 12 blocks of 0.198M, 0.54M outside: 1/3 pays for 2 blocks.
    assert roots_within_budget(1 / 3, 2_920_192, 198_016, 12) == 2
    assert roots_within_budget(1.0, 2_920_192, 198_016, 12) == 12
    with pytest.raises(ConfigError, match="cannot pay for one block"):
        roots_within_budget(0.2, 2_920_192, 198_016, 12)
    with pytest.raises(ConfigError, match="fraction in"):
        roots_within_budget(1.5, 2_920_192, 198_016, 12)


def test_the_default_budget_is_a_third_but_never_fewer_than_two_blocks():
    assert roots_within_budget(None, 2_920_192, 198_016, 12) == 2  # tiny: a third pays for 2
    # gpt2-medium, 8192 tokens: a third pays for 7 blocks of 12.6M, and the default spends them all
    assert roots_within_budget(None, 310_962_176, 12_596_224, 24) == roots_within_budget(1 / 3, 310_962_176,
                                                                                      12_596_224, 24) == 7
    # gpt2, GPT-2's 50304 (padded) tokens: the embeddings alone are 0.31 of conventional
    with pytest.raises(ConfigError, match="cannot pay for one block"):
        roots_within_budget(1 / 3, 123_886_080, 7_087_872, 12)
    assert roots_within_budget(None, 123_886_080, 7_087_872, 12) == 2
    assert roots_within_budget(None, 1_000, 100, 1) == 1  # never more roots than blocks


def base(out_dir, cache_dir, **overrides):
    values = dict(out_dir=str(out_dir), cache_dir=cache_dir, n_layer=6, n_embd=32, n_head=2, seq_len=16,
                  batch_size=2, vocab_size=512, max_steps=24, tie_every=4, eval_every=24, eval_batches=1,
                  checkpoint_every=12, log_every=4, progress=False, seed=5, tie_policy="split")
    values.update(overrides)
    return TrainConfig.from_flat(values)


def test_bad_budget_settings_are_refused(tmp_path, cache_dir):
    with pytest.raises(ConfigError, match="--param-budget is for --tie-policy split"):
        base(tmp_path, cache_dir, tie_policy="alternate", param_budget=0.3).resolved()
    with pytest.raises(ConfigError, match="needs --tie-mode shared"):
        base(tmp_path, cache_dir, tie_mode="frozen-replica").resolved()
    assert base(tmp_path, cache_dir).resolved().tying.param_budget is None  # the default, recorded as such


def test_a_split_run_respects_its_budget_and_resumes_exactly(tmp_path, cache_dir):
    """Whole run: every decision within the budget; a run stopped at 12 and resumed ends with the same
    weights and the same structure as one that never stopped."""
    whole = Trainer(base(tmp_path / "whole", cache_dir, param_budget=0.6))
    probes, gram = [], whole.controller.gradient_gram
    whole.controller.gradient_gram = lambda: probes.append(whole.step) or gram()
    summary = whole.train()
    budget = 0.6 * summary["conventional_trainable_params"]
    decisions = [d for d in whole.controller.history]
    assert decisions and all(d["trainable_params"] <= budget for d in decisions)
    # every probe led to a split, and none was paid once the budget was spent
    assert 1 < summary["final_independent_layers"] == len(probes) + 1 < len(decisions) + 1
    Trainer(base(tmp_path / "parts", cache_dir, param_budget=0.6)).train(until=12)
    resumed = Trainer(base(tmp_path / "parts", cache_dir, param_budget=0.6, resume="auto"))
    again = resumed.train()
    assert again["final_state"] == summary["final_state"]
    assert again["rank_param_checksums"] == summary["rank_param_checksums"]


def test_auto_rank_is_a_recorded_fact_within_the_default_budget_and_resumes(tmp_path, cache_dir):
    """``--tie-relax lora:auto``: the rank the default third pays for after whole roots is recorded as
    ``lora:R`` (config.json and the checkpoints, so export and resume rebuild the same model); the run never
    exceeds a third of conventional's parameters, and a resumed run ends where an unbroken one does."""
    whole = Trainer(base(tmp_path / "whole", cache_dir, tie_relax="lora:auto", n_embd=64))
    summary = whole.train()
    record = json.loads((tmp_path / "whole" / "config.json").read_text())
    rank = int(record["tie_relax"].split(":")[1])
    assert record["resolved"]["tie_relax"] == record["tie_relax"] and rank >= 1
    assert max(d["trainable_params"] for d in whole.controller.history) <= summary["conventional_trainable_params"] / 3
    members = 6 - summary["final_independent_layers"]
    slack = members * whole.tying.delta_numel_per_rank()  # one more rank for every member
    assert summary["final_trainable_params"] > summary["conventional_trainable_params"] / 3 - slack
    Trainer(base(tmp_path / "parts", cache_dir, tie_relax="lora:auto", n_embd=64)).train(until=12)
    again = Trainer(base(tmp_path / "parts", cache_dir, tie_relax="lora:auto", n_embd=64, resume="auto")).train()
    assert again["rank_param_checksums"] == summary["rank_param_checksums"]
