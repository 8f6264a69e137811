"""Every config key with its type, its default, the values it may take and what it means, read
off the declarations of :mod:`.schema` (:mod:`.keys`), so the list cannot drift from the code:
``diffmoe config --list``, and docs/config.md generated from it.
"""

from __future__ import annotations

import difflib
import textwrap
import typing
from typing import Any

from ..errors import ConfigError
from .keys import Key, keys_of
from .ranges import Interval, Range
from .schema import Config, quote

FORMATS = ("text", "markdown")
TEXT_WIDTH = 100  # what a terminal shows; the width the project's code and docs keep to
DOC_INDENT = "    "


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


def allowed(k: Key) -> str:
    """The values ``k`` may take, as a person reads them ('' for any value of its type)."""
    if isinstance(k.check, tuple):
        return ("each " if typing.get_origin(k.type) is list else "") + "one of " + ", ".join(
            k.check)
    if isinstance(k.check, (Range, Interval)):
        return str(k.check)
    return ""


def render_text(keys: list[Key]) -> str:
    """One entry per key: ``key (type, default value)``, then indented its documentation, the
    values it may take and its resume class."""
    out, section = [], None
    for k in keys:
        if k.section != section:
            section = k.section
            out += ["" if out else None, f"{section}:"]
        out.append(f"  {k.name} ({type_name(k.type)}, default {yaml_value(k.default)})")
        values = f"values: {allowed(k)}; " if allowed(k) else ""
        for text in (k.doc, f"{values}on resume: {k.resume}"):
            out += textwrap.wrap(text, TEXT_WIDTH, initial_indent=DOC_INDENT,
                                 subsequent_indent=DOC_INDENT)
    return "\n".join(line for line in out if line is not None) + "\n"


def _cell(text: str) -> str:
    """``text`` in a Markdown table cell, as written (no emphasis, no HTML tags)."""
    for char, escaped in (("|", "\\|"), ("*", "\\*"), ("<", "&lt;"), (">", "&gt;")):
        text = text.replace(char, escaped)
    return text


MARKDOWN_HEADER = """# Config keys

Every key of a config file, with its type, its default, the values it may take and what it means,
generated from the declaration of each field of the dataclasses in `diffmoe/config/schema.py`
(`diffmoe config --list --format markdown > docs/config.md`; `tests/test_config_docs.py` fails
when this page and the code drift apart). How a config is built (defaults, `model.preset`, the
YAML file, `key=value` overrides) is in [training.md](training.md#configs). "On resume" is the
key's resume class (`diffmoe/config/keys.py`): a resume refuses to change an architecture,
objective or data key, changes an optimisation key only with `--accept-changes`, and a
bookkeeping key freely.
"""


def render_markdown(keys: list[Key]) -> str:
    """A section heading and a table of its keys per section."""
    out, section = [MARKDOWN_HEADER.rstrip("\n")], None
    for k in keys:
        if k.section != section:
            section = k.section
            out += ["", f"## `{section}`", "",
                    "| key | type | default | values | on resume | meaning |",
                    "|---|---|---|---|---|---|"]
        out.append(f"| `{k.name}` | {type_name(k.type)} | `{_cell(yaml_value(k.default))}` | "
                   f"{_cell(allowed(k))} | {k.resume} | {_cell(k.doc)} |")
    return "\n".join(out) + "\n"


def render(fmt: str, under: str = "") -> str:
    """The keys ``under`` a section or key (``train``, ``model.moe``, ``train.lr``; all for
    ''), in ``fmt`` (one of :data:`FORMATS`)."""
    every = keys_of(Config)
    keys = [k for k in every if not under or k.name == under or k.name.startswith(under + ".")]
    if not keys:
        names = sorted({k.section for k in every} | {k.name for k in every})
        close = difflib.get_close_matches(under, names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"no config key or section {quote(under)}{hint}; the sections are "
                          f"{', '.join(dict.fromkeys(k.section for k in every))}")
    return render_markdown(keys) if fmt == "markdown" else render_text(keys)
