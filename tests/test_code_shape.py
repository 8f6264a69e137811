"""The package's shape, as docs/architecture.md states it: which package may import which, no
import cycle, and no function longer than a screen unless a comment says why."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "diffmoe"
MAX_FUNCTION_LINES = 60
LONG_FUNCTION_MARK = "# long:"  # a comment right above a longer function, saying why

# docs/architecture.md's layers, bottom first: a unit may import from its own row or below.
LAYERS = [
    {"config", "errors", "paths", "fileio", "distributed", "faults"},
    {"models"},
    {"data", "diffusion"},
    {"sample", "loss", "capacity", "parallel", "ema", "checkpoint", "images", "run"},
    {"train", "t2i", "official", "evaluation"},
    {"cli", "__init__", "__main__"},
]
LAYER_OF = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def modules() -> dict[str, Path]:
    """Dotted name (``diffmoe.models.dit``) → file, for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def unit(name: str) -> str:
    """The part of the package a module belongs to: ``diffmoe.models.moe.base`` → ``models``;
    the package's own ``__init__`` is ``__init__``."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imported(name: str, path: Path, top_level_only: bool) -> set[str]:
    """The package modules ``name`` imports (inside functions too, unless ``top_level_only``)."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("diffmoe")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("diffmoe"):
                if target != "diffmoe":  # "from . import x" imports x, not the package
                    out.add(target)
                out |= {f"{target}.{a.name}" for a in node.names}
    return out


def package_imports(top_level_only: bool = False) -> dict[str, set[str]]:
    mods = modules()
    return {name: {m for m in imported(name, path, top_level_only) if m in mods and m != name}
            for name, path in mods.items()}


def test_every_unit_has_a_layer():
    assert {unit(name) for name in modules()} <= set(LAYER_OF)


def test_no_package_imports_from_a_layer_above_it():
    upward = sorted(f"{name} imports {target}"
                    for name, targets in package_imports().items() for target in targets
                    if LAYER_OF[unit(target)] > LAYER_OF[unit(name)])
    assert not upward, "\n".join(upward)


def test_models_import_only_config():
    outside = sorted(f"{name} imports {target}"
                     for name, targets in package_imports().items() if unit(name) == "models"
                     for target in targets if unit(target) not in ("models", "config"))
    assert not outside, "\n".join(outside)


def test_no_import_cycle_between_units():
    """Counting lazy imports inside functions too: no unit reaches itself through others."""
    graph: dict[str, set[str]] = {}
    for name, targets in package_imports().items():
        graph.setdefault(unit(name), set()).update(
            unit(t) for t in targets if unit(t) != unit(name))
    cycles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    cycles.append(" -> ".join(path + [start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    assert not cycles, "\n".join(cycles)


def test_no_function_longer_than_a_screen_without_a_reason():
    long_ones = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = node.end_lineno - node.lineno + 1
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            above = lines[first - 2].strip().lower() if first >= 2 else ""
            if length > MAX_FUNCTION_LINES and not above.startswith(LONG_FUNCTION_MARK):
                long_ones.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} "
                                 f"{node.name} ({length} lines)")
    assert not long_ones, "\n".join(long_ones)


def test_the_checks_see_what_they_check():
    """The walks above read the package: they find its modules, its imports (relative ones
    resolved) and a function body's length."""
    imports = package_imports()
    assert "diffmoe.models.dit" in imports and "diffmoe.config" in imports["diffmoe.models.dit"]
    assert "diffmoe.train" in imports and "diffmoe.run" in imports["diffmoe.train"]
    assert unit("diffmoe.models.moe.base") == "models"
