"""The package's architecture, checked from its source: the library (``moka_ext``) never imports
the application (``moka_ext.finetune``), and no two modules import each other, directly or
through others (imports inside functions count: they are cycles all the same)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "moka_ext"
ENTRY_POINTS = {"moka_ext.__main__"}  # runs the command; never imported by the library


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """moka_ext modules that ``name`` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and t != "moka_ext":
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {n: _imports(n, p, set(mods)) for n, p in mods.items()}


def test_the_graph_sees_the_imports_it_must():
    g = _graph()
    assert "moka_ext.finetune.models" in g["moka_ext.finetune.data"]  # from .models import cache_dir
    assert "moka_ext.layers" in g["moka_ext.finetune.models"]  # from ..layers import ...
    assert "moka_ext.ops" in g["moka_ext.layers"]
    assert "moka_ext.finetune.cli" in g["moka_ext.__main__"]


def test_library_never_imports_the_application():
    g = _graph()
    offenders = {n: sorted(d for d in deps if d.startswith("moka_ext.finetune"))
                 for n, deps in g.items()
                 if not n.startswith("moka_ext.finetune") and n not in ENTRY_POINTS}
    assert not {n: d for n, d in offenders.items() if d}


def test_no_import_cycles():
    g = _graph()
    cycles, state = [], {}

    def visit(n, stack):
        state[n] = "open"
        for d in sorted(g.get(n, ())):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[n] = "done"

    for n in sorted(g):
        if n not in state:
            visit(n, [n])
    assert not cycles


@pytest.mark.parametrize("module", ["moka_ext", "moka_ext.layers", "moka_ext.model", "moka_ext.adapter_io"])
def test_importing_the_library_loads_no_application_module(module):
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith('moka_ext.finetune')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
