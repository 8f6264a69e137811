"""Every config key with its type, its default and the comment that documents it, read off the
dataclasses of :mod:`.schema` and the comments written above (or beside) their fields, so the
list cannot drift from the code: ``diffmoe config --list``, and docs/config.md generated from it.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import io
import textwrap
import tokenize
import typing
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from . import schema
from .schema import Config, quote

FORMATS = ("text", "markdown")
TEXT_WIDTH = 100  # what a terminal shows; the width the project's code and docs keep to
DOC_INDENT = "    "


@dataclass(frozen=True)
class KeyDoc:
    """One config key: dotted name, type as a person reads it, default and documentation."""

    key: str
    type: str
    default: Any
    doc: str

    @property
    def section(self) -> str:
        return self.key.rsplit(".", 1)[0]


def _comments() -> dict[int, tuple[str, bool]]:
    """Line number in schema.py -> (the comment's text, whether the comment is alone on its
    line)."""
    source = inspect.getsource(schema)
    lines = source.splitlines()
    found = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            found[row] = (tok.string.lstrip("#").strip(), not lines[row - 1][:col].strip())
    return found


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the comment lines right above the field joined with its trailing comment
    ('' for a field with neither), for the dataclass ``cls`` defined in schema.py."""
    tree = ast.parse(inspect.getsource(schema))
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    comments = _comments()
    docs = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above, row = [], stmt.lineno - 1
        while row in comments and comments[row][1]:
            above.insert(0, comments[row][0])
            row -= 1
        beside = comments.get(stmt.end_lineno, ("", True))
        parts = above + ([beside[0]] if not beside[1] else [])
        docs[stmt.target.id] = " ".join(parts)
    return docs


def type_name(tp: Any) -> str:
    """``int``, ``str or null``, ``list of str``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names + (["null"] if type(None) in args else []))
    if origin is list:
        return f"list of {type_name(args[0])}"
    return tp.__name__


def yaml_value(value: Any) -> str:
    """A default as it is written in a config file."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return value if value else "''"
    return repr(value)


def key_docs(cls: type = Config, prefix: str = "") -> list[KeyDoc]:
    """Every key of ``cls`` and of its nested sections, in the order of the dataclasses."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    defaults = cls()
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += key_docs(tp, f"{prefix}{f.name}.")
        else:
            out.append(KeyDoc(prefix + f.name, type_name(tp), getattr(defaults, f.name),
                              docs[f.name]))
    return out


def render_text(keys: list[KeyDoc]) -> str:
    """One entry per key: ``key (type, default value)`` and its documentation, indented."""
    out, section = [], None
    for k in keys:
        if k.section != section:
            section = k.section
            out += ["" if out else None, f"{section}:"]
        out.append(f"  {k.key} ({k.type}, default {yaml_value(k.default)})")
        out += textwrap.wrap(k.doc, TEXT_WIDTH, initial_indent=DOC_INDENT,
                             subsequent_indent=DOC_INDENT)
    return "\n".join(line for line in out if line is not None) + "\n"


def _cell(text: str) -> str:
    """``text`` in a Markdown table cell, as written (no emphasis, no HTML tags)."""
    for char, escaped in (("|", "\\|"), ("*", "\\*"), ("<", "&lt;"), (">", "&gt;")):
        text = text.replace(char, escaped)
    return text


MARKDOWN_HEADER = """# Config keys

Every key of a config file, with its type, its default and what it means, generated from the
dataclasses in `diffmoe/config/schema.py` and the comment written above each field
(`diffmoe config --list --format markdown > docs/config.md`; `tests/test_config_docs.py` fails
when this page and the code drift apart). How a config is built (defaults, `model.preset`, the
YAML file, `key=value` overrides) is in [training.md](training.md#configs); what each key means
for a resumed run is in `diffmoe/config/resume.py`.
"""


def render_markdown(keys: list[KeyDoc]) -> str:
    """A section heading and a table of its keys per section."""
    out, section = [MARKDOWN_HEADER.rstrip("\n")], None
    for k in keys:
        if k.section != section:
            section = k.section
            out += ["", f"## `{section}`", "", "| key | type | default | meaning |",
                    "|---|---|---|---|"]
        out.append(f"| `{k.key}` | {k.type} | `{_cell(yaml_value(k.default))}` | "
                   f"{_cell(k.doc)} |")
    return "\n".join(out) + "\n"


def render(fmt: str, under: str = "") -> str:
    """The keys ``under`` a section or key (``train``, ``model.moe``, ``train.lr``; all for
    ''), in ``fmt`` (one of :data:`FORMATS`)."""
    every = key_docs()
    keys = [k for k in every if not under or k.key == under or k.key.startswith(under + ".")]
    if not keys:
        names = sorted({k.section for k in every} | {k.key for k in every})
        close = difflib.get_close_matches(under, names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"no config key or section {quote(under)}{hint}; the sections are "
                          f"{', '.join(dict.fromkeys(k.section for k in every))}")
    return render_markdown(keys) if fmt == "markdown" else render_text(keys)
