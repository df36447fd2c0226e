"""The house's import directions, read from the source (every import, lazy ones included).

    application   lte_convert.cli, lte_convert.commands.*, lte_convert.bench_decode
        |  may import every room
    exporters  ->  converter  ->  plugins          trt_plugins -> plugins
        |  every room may import the base
    base          lte_convert (the package), errors, atomic, checks, loading, default

No room imports the application layer, plugins imports no other room, exporters and
trt_plugins do not import each other, nothing in the package imports samples/, and the
graph has no cycles (a lazy import counts: it is still a cycle a reader has to untangle).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# folder -> its import name (pyproject.toml's package-dir mapping)
FOLDERS = {"lte_convert": "lte_convert", "converter": "lte_convert.converter",
           "plugins": "lte_convert.plugins", "exporters": "lte_convert.exporters",
           "trt_plugins": "lte_convert.trt_plugins"}
BASE = {"lte_convert", "lte_convert.errors", "lte_convert.atomic", "lte_convert.checks",
        "lte_convert.loading", "lte_convert.default"}
APPLICATION = {"lte_convert.cli", "lte_convert.bench_decode"}
# room -> the rooms it may import (besides itself)
MAY_IMPORT = {
    "base": set(),
    "plugins": {"base"},
    "converter": {"base", "plugins"},
    "exporters": {"base", "plugins", "converter"},
    "trt_plugins": {"base", "plugins"},
    "application": {"base", "plugins", "converter", "exporters", "trt_plugins"},
}


def modules() -> dict[str, Path]:
    """Import name -> source file, for every module the wheel installs."""
    found = {}
    for folder, name in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((name, *parts))] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """The package modules `path` imports anywhere in its body (`from pkg import submodule`
    names the submodule), and any import of samples/ as "samples"."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known
                     else node.module for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "samples":
                out.add("samples")
            elif name.split(".")[0] == "lte_convert":
                while name not in known:
                    name = name.rsplit(".", 1)[0]
                out.add(name)
    return out


def room(module: str) -> str:
    if module in BASE:
        return "base"
    if module in APPLICATION or module.startswith("lte_convert.commands"):
        return "application"
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in MAY_IMPORT:
        return parts[1]
    raise AssertionError(f"{module} belongs to no room: add it to BASE, APPLICATION or a room")


def graph() -> dict[str, set[str]]:
    found = modules()
    return {m: imports(p, set(found)) - {m} for m, p in found.items()}


def violations(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for m, deps in sorted(g.items()):
        for d in sorted(deps):
            if d == "samples":
                bad.append(f"{m} ({room(m)}) imports samples/ (product code never does)")
            elif room(d) != room(m) and room(d) not in MAY_IMPORT[room(m)]:
                bad.append(f"{m} ({room(m)}) imports {d} ({room(d)})")
    return bad


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    g = {m: {d for d in deps if d in g} for m, deps in g.items()}
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_every_import_goes_the_allowed_direction():
    assert violations(graph()) == []


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_the_checks_see_a_wrong_direction_and_a_cycle():
    g = graph()
    assert "lte_convert.converter.train" in g and "lte_convert.commands.fold" in g
    g["lte_convert.converter.train"] = g["lte_convert.converter.train"] | {
        "lte_convert.commands.fold"}
    g["lte_convert.plugins.spec"] = g["lte_convert.plugins.spec"] | {"lte_convert.converter.data",
                                                                     "samples"}
    assert violations(g) == [
        "lte_convert.converter.train (converter) imports lte_convert.commands.fold (application)",
        "lte_convert.plugins.spec (plugins) imports lte_convert.converter.data (converter)",
        "lte_convert.plugins.spec (plugins) imports samples/ (product code never does)",
    ]
    g = graph()
    g["lte_convert.converter.calibrate"] = g["lte_convert.converter.calibrate"] | {
        "lte_convert.converter.train"}
    assert cycles(g) == [["lte_convert.converter.calibrate", "lte_convert.converter.train"]]


def test_a_cpu_only_install_imports_and_plans_without_triton():
    """Triton is imported on the first CUDA call only: the op on CPU, the launch
    configurations and the TensorRT tactics' configs work where Triton is not installed."""
    snippet = (
        "import sys; sys.modules['triton'] = None\n"      # as if Triton were not installed
        "import torch, lte_convert.plugins\n"
        "from lte_convert.plugins.triton_configs import launch_configs\n"
        "from lte_convert.trt_plugins import aot\n"
        "from lte_convert.plugins import spec\n"
        "x, mask = torch.randn(2, 8), torch.ones(2, 2, dtype=torch.bool)\n"
        "w = torch.randn(8, 8)\n"
        "y = torch.ops.lte.sparse_ffn(x, mask, w, w, w, None, None, None, 4, 'silu')\n"
        "print(tuple(y.shape), len(launch_configs('down', 4096, 11008, 32)),\n"
        "      len(aot.configs(spec.OP_UP, d=4096, F=11008, expert_size=32, dtype='bf16')))\n")
    r = subprocess.run([sys.executable, "-c", snippet], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[:2] == ["(2,", "8)"] and int(r.stdout.split()[2]) >= 2
