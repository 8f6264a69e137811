"""A config key is declared once, as a field of its section's dataclass (:mod:`.schema`):

    lr: float = key(1e-4, OPTIMISATION, check=POSITIVE,
                    doc="AdamW learning rate (the paper: 1e-4)")

holds its type (the annotation), default, resume class, the values it may take and what it means.
Everything else that lists keys is read off these declarations by :func:`keys_of`: the
per-key checks of validation, the resume table (:mod:`.resume`), ``diffmoe config --list`` and
docs/config.md (:mod:`.docs`), the ``~`` expansion of paths (:mod:`.loading`). Checks of one key
against another stay in :mod:`.validation`.

The resume classes, what a resumed run may change:

* ``architecture``, ``objective``, ``data``: what the weights are, what they are trained to
  predict, and on what data in which order. A resume that changes one of them would continue
  another run on these weights, so it is refused.
* ``optimisation``: how the weights are updated (learning rate and its schedule, AdamW, batch,
  EMA, regularisation, loss weights, numeric precision). A resume may change them only when it
  says so (``--accept-changes``); the change is recorded in the run directory.
* ``bookkeeping``: how long the run goes, how often it logs, samples and saves, where and on
  what it runs, how it reacts to a non-finite loss, and the sample grids' settings. Free to
  change on resume, and recorded too.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Union

from .ranges import Interval, Range

ARCHITECTURE = "architecture"
OBJECTIVE = "objective"
DATA = "data"
OPTIMISATION = "optimisation"
BOOKKEEPING = "bookkeeping"
RESUME_CLASSES = (ARCHITECTURE, OBJECTIVE, DATA, OPTIMISATION, BOOKKEEPING)
REFUSED = (ARCHITECTURE, OBJECTIVE, DATA)  # never changed by a resume

# What a key's values may be: a Range (an integer), an Interval (a real number), or a tuple of
# the choices (a text, or each item of a list); None: any value of its type.
Check = Union[Range, Interval, tuple, None]


def key(default: Any, resume: str, *, doc: str, check: Check = None, path: bool = False) -> Any:
    """A dataclass field that is a config key: its ``default``, its ``resume`` class (one of
    :data:`RESUME_CLASSES`), what it means (``doc``, for the key list and docs/config.md), the
    values it may take (``check``) and whether it names a file or directory (``path``: a leading
    ``~`` in it is the home directory)."""
    if resume not in RESUME_CLASSES:
        raise ValueError(f"resume class {resume!r} is not one of {RESUME_CLASSES}")
    meta = {"doc": doc, "resume": resume, "check": check, "path": path}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class Key:
    """One declared key: its dotted name, type, default and declaration."""

    name: str
    type: Any
    default: Any
    doc: str
    resume: str
    check: Check
    path: bool

    @property
    def section(self) -> str:
        return self.name.rsplit(".", 1)[0]


def keys_of(cls: type, prefix: str = "") -> list[Key]:
    """Every key of the dataclass ``cls`` and of its nested sections, in declaration order,
    named from ``prefix`` (``"sample."`` for the keys of a ``SampleConfig``)."""
    hints = typing.get_type_hints(cls)
    defaults = cls()
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += keys_of(hints[f.name], f"{prefix}{f.name}.")
        elif "resume" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} is no config key: declare it with key()")
        else:
            out.append(Key(prefix + f.name, hints[f.name], getattr(defaults, f.name),
                           f.metadata["doc"], f.metadata["resume"], f.metadata["check"],
                           f.metadata["path"]))
    return out


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{dotted key: value}``."""
    flat: dict[str, Any] = {}
    for name, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat
