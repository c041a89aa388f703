"""The package's import graph, read from the source (every import, at module level or inside a function;
``if TYPE_CHECKING:`` blocks left out, as they never run).

Layers, lowest first: a module may import from its own layer's other packages and from lower layers,
never from a higher one (an *upward* import)::

    0  errors
    1  presets, runtime            (plain data; processes, signals, locks, atomic writes)
    2  tying, models, data, kernels, metrics, engines, checkpoint   (the components, peers)
    3  config                      (the run's settings, resolved from presets and the components' data)
    4  trainer
    5  tools                       (the train CLI, the ``megatie`` command, export, inference, finetune)

    python tests/layout.py [PACKAGE_DIR]   # counts of modules per package, upward imports, cycles
"""

from __future__ import annotations

import ast
import os
import sys
from collections import defaultdict

LAYERS = {"errors": 0, "presets": 1, "runtime": 1, "tying": 2, "models": 2, "data": 2, "kernels": 2, "metrics": 2,
          "engines": 2, "checkpoint": 2, "config": 3, "trainer": 4, "tools": 5, "__init__": 5, "__main__": 5}


def modules(package_dir: str) -> dict[str, str]:
    """``{dotted name: path}`` of every module under ``package_dir`` (a directory named ``megatie``)."""
    root = os.path.dirname(os.path.abspath(package_dir))
    found = {}
    for folder, _, files in os.walk(package_dir):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: str, name: str, known: set[str]) -> set[str]:
    """The package modules ``path`` imports (``from megatie.x import y`` counts ``megatie.x.y`` where that
    is a module)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    found: set[str] = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.split(".")[0] == "megatie")
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0 \
                    and child.module.split(".")[0] == "megatie":
                for a in child.names:
                    sub = f"{child.module}.{a.name}"
                    found.add(sub if sub in known else child.module)
            visit(child)

    visit(tree)
    return {m for m in found if m in known and m != name}


def component(dotted: str) -> str:
    """The top-level part of the package a module belongs to (``megatie.tying.agent`` -> ``tying``)."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def graph(package_dir: str, component_of=component) -> dict[str, set[str]]:
    mods = modules(package_dir)
    return {m: imports_of(p, m, set(mods)) for m, p in mods.items()}


def upward_imports(edges: dict[str, set[str]], component_of=component) -> list[tuple[str, str]]:
    up = []
    for src, targets in edges.items():
        for dst in targets:
            a, b = component_of(src), component_of(dst)
            if a != b and LAYERS[b] > LAYERS[a]:
                up.append((src, dst))
    return sorted(up)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Groups of more than one node that all reach each other (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in list(graph):
        if v not in index:
            strong(v)
    return sorted(out)


def package_cycles(edges: dict[str, set[str]], component_of=component) -> list[list[str]]:
    """Packages that import each other, directly or through others."""
    packages: dict[str, set[str]] = defaultdict(set)
    for src, targets in edges.items():
        for dst in targets:
            if component_of(src) != component_of(dst):
                packages[component_of(src)].add(component_of(dst))
    return strongly_connected(packages)


def report(package_dir: str, component_of=component) -> dict:
    edges = graph(package_dir)
    per_package: dict[str, int] = defaultdict(int)
    for m in edges:
        per_package[component_of(m)] += 1
    return {"modules": len(edges), "per_package": dict(sorted(per_package.items())),
            "upward": upward_imports(edges, component_of),
            "package_cycles": package_cycles(edges, component_of), "module_cycles": strongly_connected(edges)}


if __name__ == "__main__":
    here = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "megatie")
    r = report(here)
    print(f"{r['modules']} modules: " + ", ".join(f"{k} {v}" for k, v in r["per_package"].items()))
    print(f"{len(r['upward'])} upward imports" + "".join(f"\n  {a} -> {b}" for a, b in r["upward"]))
    for kind in ("package_cycles", "module_cycles"):
        print(f"{len(r[kind])} {kind.replace('_', ' ')}" + "".join(f"\n  {' <-> '.join(c)}" for c in r[kind]))
