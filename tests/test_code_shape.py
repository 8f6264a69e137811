"""No function in the package longer than a screen, unless a comment right above it says why.
(The import layers are checked by test_layers.py.)"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "diffmoe"
MAX_FUNCTION_LINES = 60
LONG_FUNCTION_MARK = "# long:"  # a comment right above a longer function, saying why


def long_functions() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = node.end_lineno - node.lineno + 1
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            above = lines[first - 2].strip().lower() if first >= 2 else ""
            if length > MAX_FUNCTION_LINES and not above.startswith(LONG_FUNCTION_MARK):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} "
                             f"({length} lines)")
    return found


def test_no_function_longer_than_a_screen_without_a_reason():
    found = long_functions()
    assert not found, "\n".join(found)


def test_the_check_measures_function_bodies(tmp_path, monkeypatch):
    """The walk finds a long function, and accepts it with a reason above it."""
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "long.py").write_text(f"def too_long():\n{body}\n")
    (tmp_path / "ok.py").write_text(f"# long: one table\ndef with_reason():\n{body}\n")
    monkeypatch.setitem(globals(), "PACKAGE", tmp_path)
    lines = MAX_FUNCTION_LINES + 1
    assert long_functions() == [f"{tmp_path.name}/long.py:1 too_long ({lines} lines)"]


def test_the_training_loop_fits_in_200_lines():
    """issue 17: the class that holds the loop stays short; run management lives in run.py."""
    tree = ast.parse((PACKAGE / "train.py").read_text())
    trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    assert trainer.end_lineno - trainer.lineno + 1 <= 200
