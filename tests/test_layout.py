"""The project's shape: light imports, one-way dependencies (docs/architecture.md)."""
import ast
import subprocess
import sys
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


def test_kernels_import_torch_and_triton_only():
    for path in (ROOT / "kernels").rglob("*.py"):
        for name in _imports(path):
            top = name.split(".")[0]
            assert top in {"torch", "triton", "ride_fast_kernels", "__future__", "os", "math", "functools", "typing", "dataclasses"}, (
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
