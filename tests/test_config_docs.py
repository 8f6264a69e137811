"""``diffmoe config --list`` (issue 21): every config key with its type, default and the comment
that documents it, read off the dataclasses, and docs/config.md generated from the same."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from diffmoe.cli import main
from diffmoe.config import Config, MoEConfig, TrainConfig
from diffmoe.config.docs import field_docs, key_docs, render
from diffmoe.config.resume import flatten

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_the_list_has_every_key_of_the_config_in_order():
    assert [k.key for k in key_docs()] == list(flatten(dataclasses.asdict(Config())))


def test_every_config_key_is_documented_by_a_comment():
    undocumented = [k.key for k in key_docs() if not k.doc.strip()]
    assert not undocumented, (f"write a comment above (or beside) these fields in "
                              f"diffmoe/config/schema.py: {undocumented}")


def test_a_field_is_documented_by_the_comment_lines_above_it_and_the_one_beside_it():
    moe = field_docs(MoEConfig)
    assert moe["capacity"] == (
        "C: training capacity. Expert choice/DiffMoE: each expert takes k = S*C/E tokens. "
        "Token choice: each token takes its top-C experts (C must then be a whole number).")
    train = field_docs(TrainConfig)
    assert train["batch_size"] == "global batch, split evenly over ranks"
    assert train["steps"] == "optimizer steps to train to"  # not the comment of out_dir above
    assert train["trackers"].startswith("Dashboards fed with every metrics.jsonl record")


def test_types_and_defaults_are_those_of_the_dataclasses():
    keys = {k.key: k for k in key_docs()}
    assert (keys["train.trackers"].type, keys["train.trackers"].default) == ("list of str", [])
    assert (keys["model.preset"].type, keys["model.preset"].default) == ("str or null", None)
    assert (keys["model.moe.num_experts"].type, keys["model.moe.num_experts"].default) == (
        "int", MoEConfig().num_experts)


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
