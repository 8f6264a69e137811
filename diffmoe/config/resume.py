"""What each config key means for a resumed run: its resume class, declared with the key
(:mod:`.keys` says what each class allows).

A key's class can depend on the config (:func:`key_class`): ``train.steps`` is where a cosine
learning-rate schedule reaches 0, so under ``train.lr_schedule=cosine`` it is an optimisation
setting. Every change a resume accepts is logged as a warning; none is silent.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .keys import OPTIMISATION, flatten, keys_of
from .schema import Config


def key_classes(cls: type = Config) -> dict[str, str]:
    """Dotted key -> resume class, for every key of the config dataclass ``cls``."""
    return {k.name: k.resume for k in keys_of(cls)}


KEY_CLASS = key_classes()


def key_class(key: str, before: dict[str, Any], after: dict[str, Any]) -> str:
    """The class of ``key`` for a resume from the flat config ``before`` to ``after``."""
    if key == "train.steps" and "cosine" in (before.get("train.lr_schedule"),
                                             after.get("train.lr_schedule")):
        return OPTIMISATION  # the step the cosine schedule decays to 0 at
    return KEY_CLASS[key]


@dataclass(frozen=True)
class Change:
    """One key whose value a resume changes, and its class."""

    key: str
    before: Any
    after: Any
    kind: str

    def __str__(self) -> str:
        return f"{self.key} ({self.before!r} in the checkpoint, {self.after!r} now)"


def config_changes(before: dict, after: dict) -> list[Change]:
    """The keys whose values differ from ``before`` to ``after`` (nested dicts as
    :meth:`Config.to_dict` gives them). A key ``before`` lacks, from a config written before the
    key existed, has its default there; a key the schema no longer has is not compared."""
    old = {**flatten(dataclasses.asdict(Config())), **flatten(before)}
    new = flatten(after)
    return [Change(key, old[key], value, key_class(key, old, new)) for key, value in new.items()
            if old[key] != value]
