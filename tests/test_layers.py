"""The import layers of docs/architecture.md hold: read off the source with an AST walk of
``diffmoe/`` (every import, at module level or inside a function), no module imports itself
back through others, no package imports from a layer above its own, the models import only the
config, and the data packages nothing of text-to-image."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "diffmoe"
# docs/architecture.md, "Layers": the top layer first; a package may import from its own layer
# and the layers below it.
LAYERS = (
    ("cli", "__main__"),
    ("pipeline", "train", "plan", "t2i", "official", "evaluation"),
    ("sample", "loss", "capacity", "parallel", "ema", "checkpoint", "images", "run", "hub",
     "layers", "trackers"),
    ("data", "diffusion"),
    ("models",),
    ("config", "errors", "extras", "paths", "distributed", "faults", "fileio", "device"),
)
LAYER_OF = {package: i for i, layer in enumerate(LAYERS) for package in layer}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imported(module: str, node: ast.AST) -> list[str]:
    """The diffmoe modules that one import statement of ``module`` names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in MODULES]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = module.split(".")
        if MODULES[module].name != "__init__.py":
            base = base[:-1]
        base = base[:len(base) - node.level + 1]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    names = [f"{source}.{a.name}" for a in node.names]
    return [n for n in names if n in MODULES] or ([source] if source in MODULES else [])


def _import_graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[module] = {t for node in ast.walk(tree) for t in _imported(module, node)
                         if t != module}
    return graph


def _package(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


GRAPH = _import_graph()
PACKAGE_EDGES = sorted({(_package(m), _package(t)) for m, targets in GRAPH.items()
                        for t in targets if _package(t) != _package(m) and _package(m)})


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of ``graph`` (its nodes in order), or [] if it has none."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_the_walk_sees_the_imports():
    assert ("t2i", "data") in PACKAGE_EDGES and ("data", "models") in PACKAGE_EDGES
    assert "diffmoe.distributed" in GRAPH["diffmoe.data.latents"]  # from .. import distributed
    assert "diffmoe.cli" in GRAPH["diffmoe.__main__"]


def test_no_import_cycle_between_modules_or_packages():
    assert _cycle(GRAPH) == []
    packages: dict[str, set[str]] = {}
    for source, target in PACKAGE_EDGES:
        packages.setdefault(source, set()).add(target)
    assert _cycle(packages) == []


def test_every_package_is_in_a_layer():
    assert {_package(m) for m in MODULES if _package(m)} == set(LAYER_OF)


def test_no_package_imports_from_a_layer_above():
    upward = [(s, t) for s, t in PACKAGE_EDGES if LAYER_OF[t] < LAYER_OF[s]]
    assert upward == []


def test_models_import_only_the_config_and_data_nothing_of_text_to_image():
    assert {t for s, t in PACKAGE_EDGES if s == "models"} == {"config"}
    assert "t2i" not in {t for s, t in PACKAGE_EDGES if s == "data"}
