"""The import rule: ``cli -> api -> search -> runtime -> {quant, measure} -> models -> util``, nothing back.

Every ``import``/``from`` statement in ``src/slq`` (at module head or inside a function) is read with
:mod:`ast`; an import is allowed only from a layer to a strictly lower one, or within one subpackage.
``quant`` and ``measure`` share a layer and do not import each other. Within a subpackage, the modules'
head imports must form no circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "slq"
LAYER = {"util": 0, "models": 1, "quant": 2, "measure": 2, "runtime": 3, "search": 4, "api": 5, "cli": 6,
         "__main__": 7, "__init__": 7}


def _module(path: Path, src: Path = SRC) -> list[str]:
    rel = path.relative_to(src).with_suffix("")
    parts = list(rel.parts)
    return parts


def _imports(path: Path, *, src: Path = SRC, head_only: bool = False):
    """(lineno, target dotted parts under slq) for each intra-package import of ``path``."""
    tree = ast.parse(path.read_text())
    me = _module(path, src)
    pkg = me[:-1]
    nodes = tree.body if head_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)] if node.level > 1 else pkg
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and (node.module == "slq" or node.module.startswith("slq.")):
                target = node.module.split(".")[1:]
            else:
                continue
            if not target:  # from . import x  (in the top package)
                target = [node.names[0].name]
            yield node.lineno, target, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("slq."):
                    yield node.lineno, a.name.split(".")[1:], []


def _top(parts: list[str]) -> str:
    return parts[0] if parts else "__init__"


def violations(src: Path = SRC) -> list[str]:
    bad = []
    for path in sorted(src.rglob("*.py")):
        me = _module(path, src)
        mine = _top(me) if len(me) > 1 else me[0]
        for lineno, target, _ in _imports(path, src=src):
            theirs = _top(target)
            if theirs == mine or theirs not in LAYER or mine not in LAYER:
                continue
            if LAYER[theirs] >= LAYER[mine]:
                bad.append(f"{path.relative_to(src)}:{lineno} imports slq.{'.'.join(target)} ({mine} -> {theirs})")
    return bad


def module_cycles(src: Path = SRC) -> list[list[str]]:
    """Circles among modules through head-level imports."""
    graph: dict[str, set[str]] = {}
    names = {".".join(_module(p, src)): p for p in src.rglob("*.py")}
    for dotted, path in names.items():
        deps = set()
        for _, target, imported in _imports(path, src=src, head_only=True):
            t = ".".join(target)
            for name in imported or [""]:
                sub = f"{t}.{name}" if name else t
                if sub in names:
                    deps.add(sub)
                elif f"{t}.__init__" in names:
                    deps.add(f"{t}.__init__")
                elif t in names:
                    deps.add(t)
        graph[dotted] = deps - {dotted}
    cycles, state = [], {}

    def visit(n, stack):
        state[n] = 1
        stack.append(n)
        for d in graph.get(n, ()):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [])
    return cycles


def test_no_import_runs_back_up_the_layers():
    assert violations() == []


def test_no_circle_among_module_head_imports():
    assert module_cycles() == []


def test_rule_checker_catches_a_back_up_import(tmp_path):
    """The checker itself fails on a quant module importing search, and on a circle."""
    (tmp_path / "quant").mkdir()
    (tmp_path / "search").mkdir()
    (tmp_path / "quant" / "a.py").write_text("from ..search.b import x\n")
    (tmp_path / "search" / "b.py").write_text("from ..quant.a import y\nx = 1\n")
    assert any("quant -> search" in v for v in violations(tmp_path))
    assert module_cycles(tmp_path)


@pytest.mark.parametrize("sub", ["util", "models", "quant", "measure", "runtime", "search"])
def test_each_stage_is_a_subpackage(sub):
    assert (SRC / sub / "__init__.py").is_file()
