"""A config key is declared once, in its dataclass field (issue 35): a key declared nowhere else
has its resume class, is listed with its values and resume class, loaded, checked and
suggested."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest

from diffmoe.config import Config, TrainConfig, check_keys
from diffmoe.config.docs import render_markdown, render_text
from diffmoe.config.keys import OPTIMISATION, key, keys_of
from diffmoe.config.loading import convert
from diffmoe.config.ranges import FRACTION, NON_NEGATIVE, POSITIVE, PROBABILITY, STEP, check_real
from diffmoe.config.resume import key_classes
from diffmoe.errors import ConfigError


@dataclass
class KnobTrain(TrainConfig):
    new_knob: int = key(3, OPTIMISATION, check=STEP, doc="A knob declared nowhere else.")


@dataclass
class KnobConfig(Config):
    train: KnobTrain = field(default_factory=KnobTrain)


def test_a_key_declared_only_in_its_field_reaches_resume_docs_checks_and_loading():
    knob = {k.name: k for k in keys_of(KnobConfig)}["train.new_knob"]
    assert (knob.type, knob.default, knob.resume, knob.check) == (int, 3, OPTIMISATION, STEP)
    assert key_classes(KnobConfig)["train.new_knob"] == OPTIMISATION
    assert ("| `train.new_knob` | int | `3` | 1..99999999 | optimisation | A knob declared "
            "nowhere else. |") in render_markdown(keys_of(KnobConfig))
    assert "values: 1..99999999; on resume: optimisation" in render_text(keys_of(KnobConfig))
    with pytest.raises(ConfigError, match="^train.new_knob=0 must be a positive integer$"):
        check_keys(KnobConfig(train=KnobTrain(new_knob=0)))
    assert convert("", {"train": {"new_knob": "7"}}, KnobConfig).train.new_knob == 7
    with pytest.raises(ConfigError, match="did you mean 'train.new_knob'"):
        convert("", {"train": {"new_knb": 7}}, KnobConfig)


def test_a_field_without_a_declaration_is_refused():
    @dataclass
    class Loose:
        knob: int = 3

    with pytest.raises(TypeError, match="Loose.knob is no config key: declare it with key"):
        keys_of(Loose)



@pytest.mark.parametrize("bounds, inside, outside, said", [
    (POSITIVE, 1e-9, 0.0, "positive"),
    (NON_NEGATIVE, 0.0, -1e-9, ">= 0"),
    (FRACTION, 0.0, 1.0, "in [0, 1)"),
    (PROBABILITY, 1.0, 1.5, "in [0, 1]"),
])
def test_real_bounds_say_what_they_allow(bounds, inside, outside, said):
    check_real("x", inside, bounds)
    with pytest.raises(ConfigError, match=rf"^x={outside} must be {re.escape(said)} \(why\)$"):
        check_real("x", outside, bounds.replace(hint="why"))
