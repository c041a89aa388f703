"""Golden losses (tests/golden.py): a short run of each family on each engine computes, step by step,
the losses pinned in tests/golden/losses.json - through the launchers, with regroups of every kind."""

from __future__ import annotations

import pytest

from golden import ENGINES, FAMILIES, environment, load_golden, mismatch, run_losses


@pytest.fixture(scope="module")
def golden():
    pinned = load_golden()
    here = environment()
    if pinned["environment"] != here:
        pytest.skip(f"golden losses were computed with {pinned['environment']}, this is {here}: "
                    "record them anew with `python tests/golden.py --record` on the code they must pin")
    return pinned


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return str(tmp_path_factory.mktemp("golden"))


def _engine_params():
    for engine, (_, ranks) in ENGINES.items():
        # Every DeepSpeed start-up costs 10-30 s on two cores: those runs are in the slow set.
        marks = [pytest.mark.slow] if engine != "torch" else []
        yield pytest.param(engine, marks=marks, id=engine)


@pytest.mark.parametrize("engine", list(_engine_params()))
@pytest.mark.parametrize("family", FAMILIES)
def test_losses_equal_the_pinned_ones(golden, work, family, engine):
    if engine != "torch":
        pytest.importorskip("deepspeed")
    losses = run_losses(family, engine, work)
    problem = mismatch(golden["runs"][f"{family}/{engine}"], losses)
    assert problem is None, f"{family}/{engine}: {problem}"


def test_the_comparison_catches_a_small_change():
    pinned = [5.0, 4.5, 4.25]
    assert mismatch(pinned, list(pinned)) is None
    assert mismatch(pinned, [5.0, 4.5, 4.25 * (1 + 1e-4)]).startswith("step 3")
    assert mismatch(pinned, pinned[:2]) is not None
