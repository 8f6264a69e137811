"""``diffmoe config --list`` (issue 21): every config key with its type, default, values, resume
class and meaning, read off the declarations of the dataclass fields (issue 35), and
docs/config.md generated from the same."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from diffmoe.cli import main
from diffmoe.config import Config, MoEConfig
from diffmoe.config.docs import render
from diffmoe.config.keys import flatten, keys_of

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_the_list_has_every_key_of_the_config_in_order():
    assert [k.name for k in keys_of(Config)] == list(flatten(dataclasses.asdict(Config())))


def test_every_config_key_is_documented():
    undocumented = [k.name for k in keys_of(Config) if not k.doc.strip()]
    assert not undocumented, (f"give these fields a doc in diffmoe/config/schema.py: "
                              f"{undocumented}")


def test_types_defaults_and_values_are_those_of_the_declarations():
    keys = {k.name: k for k in keys_of(Config)}
    assert (keys["train.trackers"].type, keys["train.trackers"].default) == (list[str], [])
    assert keys["model.preset"].default is None
    assert (keys["model.moe.num_experts"].type, keys["model.moe.num_experts"].default) == (
        int, MoEConfig().num_experts)
    text = render("text", "model.moe.capacity")
    assert "C: training capacity. Expert choice/DiffMoE: each expert takes k = S*C/E" in text
    assert "values: positive; on resume: architecture" in text
    assert "values: each one of tensorboard, wandb; on resume: bookkeeping" in render(
        "text", "train.trackers")
    assert "values: 1..4096; on resume: architecture" in render("text", "model.moe.num_experts")


def test_docs_config_md_is_generated_from_the_code():
    assert DOC.read_text() == render("markdown"), (
        "docs/config.md is out of date: run diffmoe config --list --format markdown > "
        "docs/config.md")


def test_the_command_lists_a_section_or_one_key(capsys):
    assert main(["config", "--list", "train.trackers"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[:2] == ["train:", "  train.trackers (list of str, default [])"]
    assert "Dashboards fed with every metrics.jsonl record" in out
    assert main(["config", "--list", "model.moe"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()
              if line.startswith("  model.")]
    assert listed == [f"model.moe.{f.name}" for f in dataclasses.fields(MoEConfig)]


def test_train_help_points_at_the_list(capsys):
    try:
        main(["train", "--help"])
    except SystemExit:
        pass
    assert "diffmoe config --list" in capsys.readouterr().out
