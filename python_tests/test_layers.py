"""The package's imports point down its layers (docs/architecture.md), and none is circular.

The sources are read, not imported: every `import` / `from ... import` in
devit_ext/ and kernels/ (installed as devit_ext.kernels), at module level or
inside a function, is an edge from its module to the module it names. A module
may import from its own layer or a lower one, never a higher one, and the
edges must not form a cycle. A module no layer claims fails the test: give it
a layer here and in docs/architecture.md.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"devit_ext": ROOT / "devit_ext", "devit_ext.kernels": ROOT / "kernels"}

# lowest first; a name claims the module of that name and everything under it
LAYERS = [
    ("ground: build, checks, shapes", ["devit_ext._version", "devit_ext._build", "devit_ext.checks", "devit_ext.shapes",
                                        "devit_ext.cct.shapes"]),
    ("ground: kernels", ["devit_ext.kernels"]),
    ("ground: ops", ["devit_ext.ops"]),
    ("ground: protocol", ["devit_ext.protocol", "devit_ext.wire", "devit_ext.auth"]),
    ("model", ["devit_ext.model", "devit_ext.model_files", "devit_ext.cct"]),
    ("methods", ["devit_ext.budgets", "devit_ext.latency", "devit_ext.decomposition", "devit_ext.importance", "devit_ext.partition", "devit_ext.data",
                 "devit_ext.checkpoint", "devit_ext.teacher", "devit_ext.dekd",
                 "devit_ext.training", "devit_ext.engines"]),
    ("top", ["devit_ext.evaluate", "devit_ext.export", "devit_ext.run_dir", "devit_ext.imagefolder",
             "devit_ext.commands", "devit_ext.cli", "devit_ext.__main__", "devit_ext.demo", "devit_ext.bench",
             "devit_ext._timm_hook"]),
]
# the package's __init__: lazy re-exports of the public API, part of the top layer (the CLI reads
# __version__ and build_info through it); nothing below the top may import it
FACADE = "devit_ext"


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if pkg == "devit_ext" and parts[0] == "kernels":
                continue  # a local link to kernels/ (how a worktree tests its own kernels), not a source
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = path
    return out


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The longest known module that `name` is, or lies in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _edges(name: str, path: Path) -> set[str]:
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                full = ".".join(base + ([node.module] if node.module else []))
            else:
                full = node.module or ""
            targets = [f"{full}.{a.name}" if f"{full}.{a.name}" in MODULES else full for a in node.names]
        else:
            continue
        for t in targets:
            if t == "devit_ext" or t.startswith("devit_ext."):
                owner = _owner(t)
                if owner is not None and owner != name:
                    out.add(owner)
    return out


GRAPH = {name: _edges(name, path) for name, path in MODULES.items()}


def _layer(name: str) -> int | None:
    if name == FACADE:
        return len(LAYERS) - 1
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (rank, len(p))
    return None if best is None else best[0]


def _label(rank: int) -> str:
    return LAYERS[rank][0]


def test_the_walk_sees_the_package():
    # a broken walk (wrong root, no edges found) must not pass silently
    assert "devit_ext.model" in MODULES and "devit_ext.kernels.ensemble_fusion" in MODULES
    assert "devit_ext.ops" in GRAPH["devit_ext.engines.local"]
    assert "devit_ext.kernels._launch" in GRAPH["devit_ext.ops.dispatch"]


def test_every_module_has_a_layer():
    unplaced = sorted(n for n in MODULES if _layer(n) is None)
    assert not unplaced, f"modules in no layer (add them to LAYERS and docs/architecture.md): {unplaced}"


def test_imports_point_down():
    upward = []
    for src, targets in GRAPH.items():
        for dst in targets:
            if _layer(dst) > _layer(src):
                upward.append(f"{src} ({_label(_layer(src))}) imports {dst} ({_label(_layer(dst))})")
    assert not upward, "imports pointing up the layers:\n  " + "\n  ".join(sorted(upward))


def test_no_circular_imports():
    # Tarjan's strongly connected components; any component of two or more modules is a cycle
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH.get(v, ()):
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
                cycles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"circular imports: {cycles}"


@pytest.mark.parametrize("rank", range(len(LAYERS)))
def test_architecture_doc_names_every_layer(rank):
    doc = (ROOT / "docs" / "architecture.md").read_text()
    for prefix in LAYERS[rank][1]:
        short = prefix.removeprefix("devit_ext.")
        if any(m == prefix or m.startswith(prefix + ".") for m in MODULES):
            assert f"`{short}" in doc, f"docs/architecture.md does not describe {prefix}"
