"""No import cycle in imaging_tasks/, read from the source with ``ast`` (nothing is imported to build the graph).

Every import counts, at module level or inside a function (a lazy import that "breaks" a loop still makes one:
it only moves the failure to the call that first runs it), and importing ``a.b.c`` counts as importing the
packages ``a.b`` and ``a`` too, since Python runs their ``__init__`` first.  Only ``if TYPE_CHECKING:`` blocks are
left out (never run).  Besides, each module of ``imaging_tasks.deid`` is imported first in a fresh
interpreter, then the others.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "imaging_tasks"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _type_checking_only(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules ``name`` imports (with the packages on their way), anywhere in its code."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    stack: list[ast.AST] = [ast.parse(path.read_text(), str(path))]
    while stack:
        node = stack.pop()
        if _type_checking_only(node):
            continue
        stack.extend(ast.iter_child_nodes(node))
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{a.name}" for a in node.names]  # `from pkg import submodule`
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                candidate = ".".join(parts[:i])
                if candidate in known and candidate != name:
                    found.add(candidate)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    graph = {name: _imports(name, path, known) for name, path in mods.items()}
    for name in mods:  # a module's own packages run first; they are not its imports (nor it theirs)
        graph[name] -= {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return sorted(out)


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "imaging_tasks.deid.rules" in graph["imaging_tasks.deid.stream"]  # from . import rules
    assert "imaging_tasks.deid" in graph["imaging_tasks.index"]  # importing deid.pseudonym runs deid/__init__
    assert "imaging_tasks.formats" in graph["imaging_tasks.index"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_in_imaging_tasks():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_deid_layers():
    """deid's DICOM modules stack in one direction; the helpers index, deid and the audit share sit below all
    three; nothing in deid imports index or the pipeline."""
    graph = import_graph()
    deid = "imaging_tasks.deid."
    order = ["tree", "dicom", "stream", "reference", "pixels", "rules", "allowlist", "profile"]
    for i, upper in enumerate(order):
        for lower in order[:i]:
            assert deid + lower not in graph[deid + upper], f"deid.{upper} imports deid.{lower}"
    assert graph["imaging_tasks.formats"] == set()
    for name, deps in graph.items():
        if name.startswith(deid) or name == "imaging_tasks.deid" or name == "imaging_tasks.phi_audit":
            assert not deps & {"imaging_tasks.index", "imaging_tasks.pipeline", "imaging_tasks.cli"}, (name, deps)


DEID_MODULES = sorted(m for m in _modules() if m.startswith("imaging_tasks.deid"))


@pytest.mark.parametrize("first", DEID_MODULES)
def test_each_deid_module_imports_first(first):
    """In a fresh interpreter: ``first`` imported before anything else of the project, then the rest of deid."""
    rest = [m for m in DEID_MODULES if m != first]
    code = "; ".join(f"import {m}" for m in [first, *rest])
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
