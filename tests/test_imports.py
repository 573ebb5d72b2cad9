"""The import graph of the engine and the launchers: no cycle, and nothing below the CLI imports it.

Every ``import`` / ``from ... import`` statement of every module counts, also those inside functions
(an import inside a function hides a cycle from Python but not from a reader). Imports of a module
by a string (the stage registry's entries) are not statements and do not count: that is how a
registry names its plug-ins.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "launchers")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports (statements anywhere in the file)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    pkg = name if is_pkg else name.rpartition(".")[0]
    out: set[str] = set()

    def resolve(mod: str) -> str | None:
        while mod and mod not in known:
            mod = mod.rpartition(".")[0]
        return mod or None

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                m = resolve(a.name)
                if m:
                    out.add(m)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:     # `from . import x` imports the submodule x when there is one
                sub = f"{mod}.{a.name}" if mod else a.name
                m = resolve(sub) if sub in known else resolve(mod)
                if m:
                    out.add(m)
    out.discard(name)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {n: imports_of(n, p, known) for n, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
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
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_parser_sees_imports_inside_functions():
    g = graph()
    assert "engine.data.tario" in g["engine.cache.format"]          # a top-level `from ..data import tario`
    assert "engine.models.load" in g["engine.models.counts"]         # imported inside a function
    assert {"engine.errors", "engine.stages"} <= g["engine.cli"]


def test_no_import_cycle():
    found = cycles(graph())
    assert found == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_nothing_below_the_cli_imports_it():
    g = graph()
    users = sorted(n for n, deps in g.items() if "engine.cli" in deps)
    assert users == [], f"modules importing engine.cli: {users}"


def test_the_stream_does_not_import_the_cache_and_only_dist_knows_ranks():
    g = graph()
    assert not any(d.startswith("engine.cache") for d in g["engine.data.stream"])
    rank_env = ("RANK", "WORLD_SIZE", "SLURM_PROCID", "LOCAL_RANK")
    for name, path in modules().items():
        if name in ("engine.dist", "launchers.local", "launchers.slurm"):
            continue
        text = path.read_text(encoding="utf-8")
        for var in rank_env:
            assert f'environ.get("{var}"' not in text and f'environ["{var}"]' not in text, (name, var)
