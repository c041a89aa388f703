"""Physical tying on real transformers models: identity, storage, snapshot semantics, gradients."""

import copy
import random

import pytest
import torch

from helpers import VOCAB, lm_loss, tiny_model
from megatie.errors import ConfigError
from megatie.tying.tie_map import state_from_action
from megatie.tying.layers import LayerTying, count_parameters, find_blocks

MODELS = ["gpt2", "bert", "llama"]


def random_state(rng, n):
    return state_from_action([rng.randint(0, i) for i in range(n)])


def snapshot(tying):
    return [[t.detach().clone() for t in tying.block_tensors(i)] for i in range(tying.num_blocks)]


def expected_after(vals, old, new, frozen):
    """docs/method.md ("What a decision does to weights") written out independently: copies read the
    weights from before the decision."""
    out = []
    for i in range(len(new)):
        changed = old[i] != new[i] or i in frozen
        out.append(vals[i] if not changed or new[i] == i else vals[new[i]])
    return out


def check_invariants(model, tying):
    per_block = sum(t.numel() for t in tying.block_tensors(0))
    block_ids = set()
    for i in range(tying.num_blocks):
        root = tying.state[i]
        mine = [p for _, p in tying.blocks[i].named_parameters(remove_duplicate=False)]
        if i in tying.frozen:
            assert all(not p.requires_grad for p in mine)
        elif root == i:
            assert all(p.requires_grad for p in mine)
        elif tying.mode == "shared":
            rootp = [p for _, p in tying.blocks[root].named_parameters(remove_duplicate=False)]
            assert all(a is b for a, b in zip(mine, rootp)), f"block {i} does not alias root {root}"
        else:
            assert mine == []  # frozen-replica members hold views, not parameters
            views = [getattr(tying._slot_module(i, k), n) for k, (_, n) in enumerate(tying.slots)]
            assert all(v.data_ptr() == r.data_ptr() for v, r in zip(views, tying.root_parameters(root)))
            assert all(not v.requires_grad for v in views)
        block_ids |= {id(p) for p in mine}
    outside = sum(p.numel() for p in model.parameters() if id(p) not in block_ids)
    owners = len({r for i, r in enumerate(tying.state) if i not in tying.frozen}) + len(tying.frozen)
    trainable, total = count_parameters(model)
    assert total == outside + owners * per_block
    assert trainable == total - len(tying.frozen) * per_block
    assert tying.untied_parameter_count() == outside + tying.num_blocks * per_block


def perturb_and_retie(model, tying, rng):
    """'Train' (perturb every trainable tensor, so copies are distinguishable), move to a random state,
    and check the weights every block ends with and the invariants."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    vals, old, frozen = snapshot(tying), list(tying.state), set(tying.frozen)
    new = random_state(rng, tying.num_blocks)
    plan = tying.apply(new)
    assert plan.new_state == new
    for i, expected in enumerate(expected_after(vals, old, new, frozen)):
        for got, want in zip(tying.block_tensors(i), expected):
            assert torch.equal(got, want), f"block {i} has the wrong weights after {old} -> {new}"
    check_invariants(model, tying)


@pytest.mark.parametrize("mode", ["shared", "frozen-replica"])
@pytest.mark.parametrize("kind", MODELS)
def test_random_state_sequences(kind, mode):
    rng = random.Random(hash((kind, mode)) % 1000)
    model = tiny_model(kind, n_layer=6)
    tying = LayerTying(model, mode)
    tying.initialize([0] * 6, frozen=range(1, 6))
    check_invariants(model, tying)
    batch = torch.randint(0, VOCAB, (2, 8))
    for _ in range(12):
        perturb_and_retie(model, tying, rng)
        assert torch.isfinite(lm_loss(model, batch))


def test_snapshot_root_retied_while_member_unties():
    model = tiny_model("gpt2", n_layer=4)
    tying = LayerTying(model)
    tying.initialize([0, 1, 1, 3])
    root1_before = [t.detach().clone() for t in tying.block_tensors(1)]
    tying.apply([0, 0, 2, 3])  # block 1 re-tied to 0, its member 2 unties
    assert all(torch.equal(a, b) for a, b in zip(tying.block_tensors(2), root1_before))
    assert all(a is b for a, b in zip(tying.block_tensors(1), tying.block_tensors(0)))
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(tying.block_tensors(2), tying.block_tensors(1)))


def test_plan_lists_created_and_removed():
    model = tiny_model("gpt2", n_layer=4)
    tying = LayerTying(model)
    tying.initialize([0, 1, 1, 3])
    root1 = tying.root_parameters(1)
    root3 = tying.root_parameters(3)
    plan = tying.apply([0, 0, 2, 2])
    assert {id(p) for p in plan.removed} == {id(p) for p in root1 + root3}
    assert [src for _, src in plan.created] == root1  # block 2 inherits from its old root 1
    assert tying.apply([0, 0, 2, 2]).changes_parameters is False


def untied_copy(model, tying):
    """The same function as ``model`` with every block owning a copy of its root's weights."""
    kind = {"GPT2LMHeadModel": "gpt2", "BertForMaskedLM": "bert", "LlamaForCausalLM": "llama"}[type(model).__name__]
    ref = tiny_model(kind, n_layer=tying.num_blocks, seed=123)
    ref.load_state_dict(model.state_dict(), strict=False)
    ref_tying = LayerTying(ref)
    for i in range(tying.num_blocks):
        with torch.no_grad():
            for dst, src in zip(ref_tying.block_tensors(i), tying.block_tensors(i)):
                dst.copy_(src)
    return ref, ref_tying


@pytest.mark.parametrize("kind", MODELS)
def test_shared_gradients_are_sums_over_positions(kind):
    model = tiny_model(kind, n_layer=5)
    tying = LayerTying(model, "shared")
    state = [0, 0, 2, 0, 2]
    tying.initialize(state)
    ref, ref_tying = untied_copy(model, tying)
    batch = torch.randint(0, VOCAB, (3, 10))
    loss, ref_loss = lm_loss(model, batch), lm_loss(ref, batch)
    assert torch.allclose(loss, ref_loss, atol=1e-6)
    loss.backward()
    ref_loss.backward()
    for root, members in {0: [0, 1, 3], 2: [2, 4]}.items():
        for k, p in enumerate(tying.root_parameters(root)):
            expected = sum(ref_tying.block_tensors(i)[k].grad for i in members)
            assert torch.allclose(p.grad, expected, atol=1e-6, rtol=1e-5)


def test_frozen_replica_members_send_no_gradient():
    model = tiny_model("gpt2", n_layer=4)
    tying = LayerTying(model, "frozen-replica")
    tying.initialize([0, 0, 2, 2])
    ref, ref_tying = untied_copy(model, tying)
    batch = torch.randint(0, VOCAB, (3, 10))
    lm_loss(model, batch).backward()
    lm_loss(ref, batch).backward()
    for root in (0, 2):
        for p, r in zip(tying.root_parameters(root), ref_tying.block_tensors(root)):
            assert torch.allclose(p.grad, r.grad, atol=1e-6, rtol=1e-5)
    # The view follows the root even when an optimizer re-points the root's storage.
    root0 = tying.root_parameters(0)
    with torch.no_grad():
        for p in root0:
            p.data = p.data + 1.0
    tying.blocks[1](torch.zeros(1, 2, 32))
    assert torch.equal(getattr(tying._slot_module(1, 0), tying.slots[0][1]), root0[0])


def test_frozen_blocks_start_untrainable_and_train_after_first_decision():
    model = tiny_model("gpt2", n_layer=4)
    tying = LayerTying(model)
    tying.initialize([0, 0, 0, 0], frozen=[1, 2, 3])
    frozen_w = [t.detach().clone() for t in tying.block_tensors(2)]
    batch = torch.randint(0, VOCAB, (2, 8))
    lm_loss(model, batch).backward()
    assert all(p.grad is None for p in tying.block_tensors(2))
    plan = tying.apply([0, 1, 2, 0])
    # Block 2 keeps its initial weights and now trains; block 3 copies block 0; 1 keeps its own.
    assert all(torch.equal(a, b) for a, b in zip(tying.block_tensors(2), frozen_w))
    assert all(p.requires_grad for p in tying.block_tensors(2))
    assert sum(src is None for _, src in plan.created) == 2 * len(tying.slots)
    assert all(a is b for a, b in zip(tying.block_tensors(3), tying.block_tensors(0)))


def test_find_blocks_paths_and_errors():
    assert find_blocks(tiny_model("gpt2"))[0] == "transformer.h"
    assert find_blocks(tiny_model("bert"))[0] == "bert.encoder.layer"
    assert find_blocks(tiny_model("llama"))[0] == "model.layers"
    wrapper = torch.nn.Sequential(tiny_model("gpt2"))
    assert find_blocks(wrapper)[0] == "0.transformer.h"  # generic search
    with pytest.raises(ConfigError, match="no submodule"):
        find_blocks(tiny_model("gpt2"), "transformer.nope")
    with pytest.raises(ConfigError, match="not a non-empty ModuleList"):
        find_blocks(tiny_model("gpt2"), "transformer.wte")


@pytest.mark.parametrize("mode", ["shared", "frozen-replica"])
def test_vit_blocks_tie(mode):
    from megatie.models import get_spec

    model = get_spec("vit").build(6, 32, 4, 5, 3, seed=0, image_size=16, patch_size=8, num_channels=3)
    tying = LayerTying(model, mode, block_path=get_spec("vit").block_path)
    tying.initialize([0] * 6, frozen=range(1, 6))
    rng = random.Random(5)
    for _ in range(8):
        perturb_and_retie(model, tying, rng)
        out = model(pixel_values=torch.randn(2, 3, 16, 16)).logits
        assert out.shape == (2, 3) and torch.isfinite(out).all()


def test_bad_inputs():
    model = tiny_model("gpt2", n_layer=4)
    with pytest.raises(ConfigError, match="unknown tie mode"):
        LayerTying(model, "weird")
    tying = LayerTying(model)
    with pytest.raises(ValueError, match="out of range"):
        tying.apply([0, 2, 0, 0])
    with pytest.raises(ValueError, match="has 3 entries"):
        tying.apply([0, 0, 0])
    with pytest.raises(ConfigError, match="block 0 always trains"):
        LayerTying(tiny_model("gpt2", n_layer=4)).initialize([0, 1, 2, 3], frozen=[0])
    with pytest.raises(ConfigError, match="frozen"):
        LayerTying(tiny_model("gpt2", n_layer=4)).initialize([0, 1, 1, 3], frozen=[1])
    tying.initialize([0, 0, 2, 3])
    with pytest.raises(RuntimeError, match="once"):
        tying.initialize([0, 0, 2, 3])


def test_deepcopy_keeps_aliasing():
    model = tiny_model("gpt2", n_layer=4)
    LayerTying(model).initialize([0, 0, 0, 3])
    clone = copy.deepcopy(model)
    assert clone.transformer.h[1].mlp.c_fc.weight is clone.transformer.h[0].mlp.c_fc.weight
