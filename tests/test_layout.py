"""The package's architecture, checked on its source (tests/layout.py): only the few modules named at the
top, components in their packages, no import from a higher layer, no packages importing each other."""

from __future__ import annotations

import os

import pytest

import layout

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "megatie")


@pytest.fixture(scope="module")
def edges():
    return layout.graph(PACKAGE)


def test_only_the_named_modules_at_the_top():
    top = sorted(name[:-3] for name in os.listdir(PACKAGE) if name.endswith(".py"))
    assert top == ["__init__", "__main__", "config", "errors", "presets", "trainer"]


def test_every_package_has_a_layer(edges):
    assert {layout.component(m) for m in edges} <= set(layout.LAYERS)


def test_no_upward_imports(edges):
    assert layout.upward_imports(edges) == []


def test_no_cycles(edges):
    assert layout.package_cycles(edges) == [] and layout.strongly_connected(edges) == []


def test_the_checks_catch_a_climb_and_a_cycle(edges):
    """Deliberate faults: a component importing the trainer, two packages importing each other."""
    bad = {k: set(v) for k, v in edges.items()}
    bad["megatie.tying.controller"].add("megatie.trainer")
    assert ("megatie.tying.controller", "megatie.trainer") in layout.upward_imports(bad)
    bad["megatie.data.loader"].add("megatie.models.objectives")  # objectives already import data
    assert ["data", "models"] in layout.package_cycles(bad)


def test_imports_inside_functions_count_and_type_checking_ones_do_not(tmp_path):
    pkg = tmp_path / "megatie"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "config.py").write_text("")
    (pkg / "trainer.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "data" / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                       "    from megatie.config import X\n")
    (pkg / "data" / "b.py").write_text("def f():\n    from megatie.trainer import Trainer\n")
    up = layout.upward_imports(layout.graph(str(pkg)))
    assert up == [("megatie.data.b", "megatie.trainer")]
