"""The project's shape: light imports, one-way dependencies between packages and no import cycle
inside one (docs/architecture.md)."""
import ast
import subprocess
import sys
from collections import deque
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "ride_fast"

# layer -> layers it may import (cli > demo > engine > {models, router, losses, data, profiling} > ops > kernels);
# config and io are leaves that every layer may use.
LEAVES = {"config", "io"}
ALLOWED = {
    "config": set(),
    "io": set(),
    "ops": {"config", "ops"},
    "models": {"config", "models", "ops"},
    "losses": {"config", "losses", "ops"},
    "data": {"config", "data"},
    "router": {"config", "router", "models", "ops", "data"},
    "profiling": {"config", "profiling", "models"},
    "engine": {"config", "engine", "models", "router", "losses", "data", "profiling", "ops"},
    "demo": {"config", "engine", "data", "profiling", "models"},
    "analysis": {"config", "io", "engine", "models", "router", "losses", "data", "profiling", "ops", "analysis"},
    "cli": {"config", "engine", "demo", "models", "profiling", "data", "router", "losses", "analysis"},
}


def _layer(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py") if rel.parts[0] != "__main__.py" else "cli"


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


@pytest.mark.parametrize("path", sorted(p for p in PKG.rglob("*.py") if p.name != "__init__.py" or p.parent != PKG), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_flow_one_way(path):
    layer = _layer(path)
    if layer not in ALLOWED:
        pytest.fail(f"{path.relative_to(ROOT)} is in a layer the dependency rule does not know: {layer}")
    for name in _imports(path):
        if name.startswith("ride_fast."):
            target = name.split(".")[1]
            assert target in ALLOWED[layer] | LEAVES | {layer}, f"{path.relative_to(ROOT)} ({layer}) imports {name}"
        if name.startswith("ride_fast_kernels"):
            assert layer == "ops", f"only ride_fast.ops may import the kernels: {path.relative_to(ROOT)}"


def test_kernels_import_torch_triton_and_the_standard_library_only():
    # the kernels never see ride_fast (no config object, no model): torch, triton, the standard
    # library (the compiler report's command line) and themselves
    allowed = {"torch", "triton", "ride_fast_kernels"} | set(sys.stdlib_module_names)
    for path in (ROOT / "kernels").rglob("*.py"):
        for name in _imports(path):
            top = name.split(".")[0]
            assert top in allowed and top != "ride_fast", (
                f"{path.relative_to(ROOT)} imports {name}"
            )


def test_import_is_light():
    code = (
        "import sys, ride_fast, ride_fast.models, ride_fast.losses, ride_fast.engine, ride_fast.config, ride_fast.ops;"
        "import torch;"
        "bad = [m for m in ('triton', 'nvidia.dali', 'fvcore') if m in sys.modules];"
        "assert not bad, bad;"
        "assert not torch.cuda.is_initialized()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_kernels_are_not_a_bare_top_level_package(tmp_path):
    out = subprocess.run([sys.executable, "-c", "import ride_fast_kernels, importlib.util; print(importlib.util.find_spec('kernels'))"],
                         capture_output=True, text=True, cwd=tmp_path, check=True)
    assert out.stdout.strip() == "None"


# ------------------------------------------------------------------------------------------------
# import cycles: every import in a file counts, also one inside a function (which hides a cycle
# from Python at import time but still ties the modules together)


def module_graph(root: Path, package: str = "ride_fast") -> dict[str, dict[str, int]]:
    """{module: {imported module of `package`: line of the first such import}} for every .py file
    under root/package. Every `import` / `from ... import` anywhere in a file counts; relative
    imports are resolved; `from pkg import name` points at the module pkg.name when it is one,
    else at pkg (its __init__)."""
    files = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, dict[str, int]] = {}
    for module, path in files.items():
        edges: dict[str, int] = {}
        here = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = here
                    for _ in range(node.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}" if base else pkg
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for target in targets:
                if target in files:
                    edges.setdefault(target, node.lineno)
        graph[module] = edges
    return graph


def import_cycles(graph: dict[str, dict[str, int]] | dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of the import graph that hold a cycle (two or more
    modules, or a module importing itself), each sorted, found with Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def describe_cycle(graph: dict[str, dict[str, int]], component: list[str], root: Path = ROOT) -> str:
    """The files of `component` and one shortest cycle through it, with the line of each import."""
    members, start = set(component), component[0]
    parent: dict[str, str] = {}
    queue, path = deque([start]), [start]
    while queue:
        v = queue.popleft()
        if start in graph.get(v, {}):  # v closes the cycle: walk back to start
            path = [v]
            while path[-1] != start:
                path.append(parent[path[-1]])
            path.reverse()
            break
        for w in sorted(graph.get(v, {})):
            if w in members and w != start and w not in parent:
                parent[w] = v
                queue.append(w)

    def where(module: str) -> str:
        rel = module.replace(".", "/")
        return f"{rel}/__init__.py" if (root / rel).is_dir() else f"{rel}.py"

    hops = [f"{where(a)}:{graph[a][b]} imports {b}" for a, b in zip(path, path[1:] + path[:1])]
    return f"cycle among {', '.join(where(m) for m in component)}:\n    " + "\n    ".join(hops)


def test_no_import_cycle():
    graph = module_graph(ROOT)
    cycles = import_cycles(graph)
    assert not cycles, "import cycles (imports inside functions count):\n" + "\n".join(describe_cycle(graph, c) for c in cycles)


def test_cycle_finder_finds_cycles_in_a_synthetic_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}, "f": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c"], ["e"]]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_cycle_finder_counts_imports_inside_functions_and_relative_ones(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .leaf import VALUE\n")
    (pkg / "sub" / "leaf.py").write_text("VALUE = 1\n")
    (pkg / "a.py").write_text("from . import b\nfrom .sub import leaf\n")
    (pkg / "b.py").write_text("import os\n\n\ndef late():\n    from pkg.a import b  # closes the circle only when called\n")
    graph = module_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.b": 1, "pkg.sub.leaf": 2}
    assert graph["pkg.b"] == {"pkg.a": 5}
    assert graph["pkg.sub"] == {"pkg.sub.leaf": 1}
    cycles = import_cycles(graph)
    assert cycles == [["pkg.a", "pkg.b"]]
    text = describe_cycle(graph, cycles[0], tmp_path)
    assert "pkg/a.py:1 imports pkg.b" in text and "pkg/b.py:5 imports pkg.a" in text
    (pkg / "b.py").write_text("import os\n")
    assert import_cycles(module_graph(tmp_path, "pkg")) == []
