"""Relaxed ties and placement (megatie.tying.relax): private slots, low-rank deltas, tied parts, blocks
kept unique - what each position computes with, through any sequence of decisions."""

import random

import pytest
import torch

from helpers import VOCAB, lm_loss, tiny_model
from megatie.errors import ConfigError
from megatie.tools.export import untied_state_dict
from megatie.tying.layers import LayerTying, count_parameters, unique_parameters
from megatie.tying.options import parse_relax
from megatie.tying.policies import budget_split, roots_within_budget
from megatie.tying.relax import DELTA_U, slot_part
from megatie.tying.tie_map import state_from_action

MODELS = ["gpt2", "llama", "bert"]
FULL_RANK = 32  # >= every tied matrix's smaller side in the tiny models: a delta can hold any difference


def random_state(rng, n):
    return state_from_action([rng.randint(0, i) for i in range(n)])


def perturb(model, scale=0.05):
    """'Train': move every trainable tensor, so that positions and deltas differ from their roots."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)


def logits(model, batch):
    with torch.no_grad():
        out = model(input_ids=batch)
    return out.logits


def materialised(model, tying, kind):
    """A plain transformers model holding every block's effective weights (what the hf export writes)."""
    plain = tiny_model(kind, n_layer=len(tying.blocks) + tying.offset + (tying.keep_unique in ("last", "both")),
                       seed=99)
    plain.load_state_dict(untied_state_dict(model, tying))
    return plain.eval()


def check_invariants(model, tying):
    """Private slots are never shared; tied slots alias the root; members own exactly their deltas; the
    trainable count is outside + roots x block + members x member."""
    for k, private in enumerate(tying.private):
        owners = {id(tying.block_tensors(i)[k]) for i in range(tying.num_blocks)}
        roots = {id(tying.block_tensors(r)[k]) for r in set(tying.state)}
        assert len(owners) == (tying.num_blocks if private else len(roots))
    for i in range(tying.num_blocks):
        has = [DELTA_U in tying._slot_module(i, k)._parameters for k in tying.delta_slots]
        assert all(has) if tying.state[i] != i else not any(has), f"block {i} deltas {has}"
    trainable, _ = count_parameters(model)
    roots = len(set(tying.state))
    outside = tying.untied_parameter_count() - tying.num_blocks * tying.block_numel()
    expected = outside + roots * tying.block_numel() + (tying.num_blocks - roots) * tying.member_numel()
    assert trainable == expected


@pytest.mark.parametrize("kind", MODELS)
def test_full_rank_relaxed_decisions_keep_the_function(kind):
    """With norms per position and deltas of full rank, tying loses nothing: every decision - untie (the
    delta folded into the new root), tie and re-tie (a delta from the SVD of what the position computed
    with minus its new root) - leaves the model's outputs where they were."""
    rng = random.Random(7)
    model = tiny_model(kind, n_layer=6).eval()
    tying = LayerTying(model, relax=f"norms,lora:{FULL_RANK}")
    tying.initialize([0] * 6)
    batch = torch.randint(0, VOCAB, (2, 10))
    for _ in range(10):
        perturb(model)
        before = logits(model, batch)
        old = list(tying.state)
        tying.apply(random_state(rng, 6))
        after = logits(model, batch)
        assert torch.allclose(before, after, atol=2e-4, rtol=1e-4), f"{old} -> {tying.state} changed the outputs"
        check_invariants(model, tying)


@pytest.mark.parametrize("kind", MODELS)
def test_low_rank_untie_folds_the_delta(kind):
    model = tiny_model(kind, n_layer=4).eval()
    tying = LayerTying(model, relax="lora:2")
    tying.initialize([0, 0, 0, 0])
    perturb(model)
    batch = torch.randint(0, VOCAB, (2, 10))
    before = logits(model, batch)
    plan = tying.apply([0, 1, 2, 3])
    assert torch.allclose(before, logits(model, batch), atol=1e-5)
    assert len(plan.removed) == 3 * 2 * len(tying.delta_slots)  # every member's deltas leave with it


@pytest.mark.parametrize("relax", ["norms", "lora:4", "norms,lora:4"])
@pytest.mark.parametrize("kind", MODELS)
def test_relaxed_model_equals_its_materialised_twin(kind, relax):
    """The hooks' low-rank path computes exactly what a plain model with root + U V as weights computes."""
    rng = random.Random(3)
    model = tiny_model(kind, n_layer=5).eval()
    tying = LayerTying(model, relax=relax)
    tying.initialize([0, 0, 0, 0, 0])
    batch = torch.randint(0, VOCAB, (2, 10))
    for _ in range(4):
        perturb(model)
        tying.apply(random_state(rng, 5))
        check_invariants(model, tying)
        assert torch.allclose(logits(model, batch), logits(materialised(model, tying, kind), batch), atol=1e-5)


def test_gradients_reach_root_deltas_and_private_slots():
    model = tiny_model("gpt2", n_layer=4)
    tying = LayerTying(model, relax="norms,lora:4")
    tying.initialize([0, 0, 2, 2])
    perturb(model)
    lm_loss(model, torch.randint(0, VOCAB, (2, 10))).backward()
    for p in unique_parameters(model, trainable_only=True):
        assert p.grad is not None and p.grad.abs().sum() > 0
    u = tying._deltas[1][tying.delta_slots[0]][0]
    assert u.grad.abs().sum() > 0  # U starts at zero but is learnt: V is random, not zero


def test_retie_initialises_the_delta_by_svd():
    """A member re-tied to another root gets the best rank-R approximation of what it loses."""
    model = tiny_model("gpt2", n_layer=3)
    tying = LayerTying(model, relax="lora:3")
    tying.initialize([0, 1, 2])
    perturb(model, 0.2)
    k = tying.delta_slots[0]
    own, root = tying.block_tensors(2)[k].detach().clone(), tying.block_tensors(0)[k].detach().clone()
    tying.apply([0, 1, 0])
    u, v = tying._deltas[2][k]
    want = torch.linalg.svd(own - root, full_matrices=False)
    best = (want.U[:, :3] * want.S[:3]) @ want.Vh[:3]
    assert torch.allclose(u.detach() @ v.detach(), best, atol=1e-5)


@pytest.mark.parametrize("parts,tied", [("attention", {"attention"}), ("mlp", {"mlp"})])
@pytest.mark.parametrize("kind", MODELS)
def test_tied_parts(kind, parts, tied):
    model = tiny_model(kind, n_layer=4)
    tying = LayerTying(model, parts=parts)
    tying.initialize([0, 0, 0, 0])
    for k, (prefix, _) in enumerate(tying.slots):
        assert tying.private[k] == (slot_part(prefix) not in tied), prefix
    assert any(not p for p in tying.private) and any(tying.private)
    check_invariants(model, tying)
    rng = random.Random(1)
    for _ in range(5):
        perturb(model)
        tying.apply(random_state(rng, 4))
        check_invariants(model, tying)


@pytest.mark.parametrize("keep", ["first", "last", "both"])
def test_kept_unique_blocks_stay_out_of_tying(keep):
    model = tiny_model("gpt2", n_layer=6)
    first, last = [list(b.parameters()) for b in (model.transformer.h[0], model.transformer.h[-1])]
    tying = LayerTying(model, keep_unique=keep)
    assert tying.num_blocks == 6 - (2 if keep == "both" else 1)
    assert tying.param_name(0, 0).startswith(f"transformer.h.{1 if keep != 'last' else 0}.")
    tying.initialize([0] * tying.num_blocks)
    kept = ([first] if keep != "last" else []) + ([last] if keep != "first" else [])
    block_ids = {id(t) for i in range(tying.num_blocks) for t in tying.block_tensors(i)}
    for params in kept:  # untouched, trainable, never shared
        assert all(p.requires_grad and id(p) not in block_ids for p in params)
    trainable, _ = count_parameters(model)
    outside = tying.untied_parameter_count() - tying.num_blocks * tying.block_numel()
    assert trainable == outside + tying.block_numel()
    assert torch.isfinite(lm_loss(model, torch.randint(0, VOCAB, (2, 8))))


def test_budget_pays_for_members_first():
    # 12 blocks of 100, 400 outside: conventional 1600. Every position costs at least a member's 20, a root
    # 80 more: at a budget of 0.6 (960), (960 - 400 - 12 x 20) // 80 = 4 roots; 0.3 (480) pays for none.
    assert roots_within_budget(0.6, 1600, 100, 12, per_member=20) == 4
    assert roots_within_budget(0.6, 1600, 100, 12) == 5
    with pytest.raises(ConfigError, match="cannot pay"):
        roots_within_budget(0.3, 1600, 100, 12, per_member=20)


def test_budget_with_deltas_in_a_real_model():
    model = tiny_model("gpt2", n_layer=12)
    tying = LayerTying(model, relax="norms,lora:2")
    conventional = tying.untied_parameter_count()
    roots = roots_within_budget(0.5, conventional, tying.block_numel(), 12, tying.member_numel())
    tying.initialize([0] * (12 - roots + 1) + list(range(12 - roots + 1, 12)))
    trainable, _ = count_parameters(model)
    assert trainable <= 0.5 * conventional < trainable + tying.block_numel() - tying.member_numel()


@pytest.mark.parametrize("text,want", [("none", ""), ("norms", "norms"), ("lora:8", "lora:8"),
                                       ("lora:4,norms", "norms,lora:4"), ("lora:auto", "lora:auto"),
                                       ("lora:auto,norms", "norms,lora:auto")])
def test_relax_spec(text, want):
    assert str(parse_relax(text)) == (want or "none")


@pytest.mark.parametrize("text", ["lora:0", "lora:x", "lora", "norm", "lora:-2", "lora:auto,lora:4"])
def test_bad_relax_spec_is_one_clear_error(text):
    with pytest.raises(ValueError, match="--tie-relax"):
        parse_relax(text)


def test_relax_needs_shared_mode_and_a_matching_checkpoint():
    with pytest.raises(ConfigError, match="shared"):
        LayerTying(tiny_model("gpt2", n_layer=3), "frozen-replica", relax="norms")
    saved = LayerTying(tiny_model("gpt2", n_layer=3), relax="lora:2")
    saved.initialize([0, 0, 0])
    other = LayerTying(tiny_model("gpt2", n_layer=3), relax="lora:4")
    with pytest.raises(ConfigError, match="relax"):
        other.load_state_dict(saved.state_dict())


def test_compact_export_keeps_roots_deltas_and_private_tensors(tmp_path):
    """The compact export stores each distinct tensor once and ``load_compact`` re-ties it: same logits."""
    from megatie.tools.export import _write_compact, export_sizes, load_compact

    model = tiny_model("gpt2", n_layer=6).eval()
    model.config.architectures = [type(model).__name__]
    tying = LayerTying(model, relax="norms,lora:4", keep_unique="first")
    tying.initialize([0] * 5)
    perturb(model)
    tying.apply([0, 0, 2, 2, 2])
    _write_compact(model, tying, str(tmp_path))
    loaded = load_compact(str(tmp_path))
    batch = torch.randint(0, VOCAB, (2, 10))
    assert torch.equal(logits(model, batch), logits(loaded, batch))
    assert loaded.megatie_tying.state == [0, 0, 2, 2, 2] and str(loaded.megatie_tying.relax) == "norms,lora:4"
    stored, materialised = export_sizes(tying)
    assert stored == count_parameters(model)[1] < materialised == tying.untied_parameter_count()


@pytest.mark.parametrize("flags,needle", [
    (["--tie-relax", "lora:0"], "--tie-relax"),
    (["--tie-relax", "norms", "--tie-mode", "frozen-replica", "--tie-policy", "alternate"], "shared"),
    (["--tie-keep-unique", "both", "--n-layer", "3"], "leaves 1 block"),
    (["--tie-relax", "lora:auto", "--tie-policy", "alternate"], "lora:auto .*split"),
])
def test_bad_relax_flags_are_refused_by_the_config(flags, needle):
    from megatie.tools.train_cli import build_parser, config_from_args

    with pytest.raises(ConfigError, match=needle):
        config_from_args(build_parser().parse_args(["--train-file", "x.txt", *flags])).resolved()


def test_auto_rank_spends_what_whole_roots_leave():
    # 12 blocks of 100, 400 outside (conventional 1600), members cost 4 (norms) plus 3 per rank. Budget 0.6
    # (960): roots first, (960 - 400 - 12 x 4) // 96 = 5; the rest, 960 - 400 - 500 - 7 x 4 = 32, buys
    # 7 members rank 32 // 21 = 1. The default budget is a third, kept exactly: 1 root (affordable
    # (533.3 - 400 - 48) // 96 = 0) and no rank left; a rank past the deltas' full rank is never bought.
    assert budget_split(0.6, 1600, 100, 12, 4, 3, max_rank=64) == (5, 1)
    assert budget_split(None, 1600, 100, 12, 4, 3, max_rank=64) == (1, 0)
    assert budget_split(0.9, 1600, 100, 12, 0, 1, max_rank=64) == (10, 20)  # 1440 - 400 - 1000 = 40, 2 members
    assert budget_split(0.9, 1600, 100, 12, 0, 1, max_rank=8) == (10, 8)
    with pytest.raises(ConfigError, match="cannot pay"):
        budget_split(0.2, 1600, 100, 12, 4, 3, max_rank=64)


@pytest.mark.parametrize("budget", [None, 0.5])
def test_auto_rank_keeps_the_budget_exactly_in_a_real_model(budget):
    """The final structure (the most expensive a split run passes through) fits the budget, and one rank
    more would not: the budget is kept to within one rank of every member's deltas."""
    model = tiny_model("gpt2", n_layer=12)
    tying = LayerTying(model, relax="norms,lora:auto")
    conventional, n = tying.untied_parameter_count(), tying.num_blocks
    roots, rank = budget_split(budget, conventional, tying.block_numel(), n, tying.member_numel(),
                               tying.delta_numel_per_rank(), tying.full_delta_rank())
    assert rank > 0 and roots >= 1
    tying.fix_delta_rank(rank)
    assert str(tying.relax) == f"norms,lora:{rank}"
    with pytest.raises(RuntimeError, match="once"):
        tying.fix_delta_rank(rank)
    tying.initialize([0] * (n - roots + 1) + list(range(n - roots + 1, n)))
    trainable, _ = count_parameters(model)
    share = (budget or 1 / 3) * conventional
    assert trainable <= share < trainable + (n - roots) * tying.delta_numel_per_rank()


def test_unresolved_auto_rank_makes_no_tie():
    tying = LayerTying(tiny_model("gpt2", n_layer=3), relax="lora:auto")
    with pytest.raises(RuntimeError, match="lora:auto"):
        tying.initialize([0, 0, 0])
