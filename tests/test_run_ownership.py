"""A run removes only what it wrote: pruning a checkpoint removes its own files and keeps
anything else found in its directory (a sample grid written there, a run started inside it);
an interrupted prune or write is cleaned up the same way; ``save_pretrained`` does not replace a
README.md it did not write."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from diffmoe.checkpoint import (
    DELETING_PREFIX,
    TMP_PREFIX,
    checkpoint_name,
    list_checkpoints,
    prune_checkpoints,
    remove_incomplete,
    save_checkpoint,
    verify_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]


def write_steps(root: Path, steps) -> None:
    for step in steps:
        save_checkpoint(root, step, {"model": {"w": torch.full((2,), float(step))}},
                        {"config": {}})


def test_pruning_keeps_the_files_it_did_not_write(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    write_steps(root, [1, 2])
    mine = root / checkpoint_name(1)
    (mine / "grid.png").write_bytes(b"user's grid")
    (mine / "myrun" / "checkpoints").mkdir(parents=True)
    (mine / "myrun" / "config.yaml").write_text("user's run\n")
    write_steps(root, [3])
    with caplog.at_level(logging.WARNING, logger="diffmoe"):
        prune_checkpoints(root, keep=2)
    assert (mine / "grid.png").read_bytes() == b"user's grid"
    assert (mine / "myrun" / "config.yaml").read_text() == "user's run\n"
    assert sorted(p.name for p in mine.iterdir()) == ["grid.png", "myrun"]
    # What is left is no checkpoint: it is neither listed nor pruned again.
    assert [p.name for p in list_checkpoints(root)] == [checkpoint_name(2), checkpoint_name(3)]
    assert any("did not write (grid.png, myrun)" in r.getMessage() for r in caplog.records)
    write_steps(root, [4])
    prune_checkpoints(root, keep=2)
    assert sorted(p.name for p in root.iterdir()) == [checkpoint_name(s) for s in (1, 3, 4)]


def test_a_checkpoint_folder_without_others_files_is_removed_whole(tmp_path):
    root = tmp_path / "checkpoints"
    write_steps(root, [1, 2, 3])
    prune_checkpoints(root, keep=1)
    assert sorted(p.name for p in root.iterdir()) == [checkpoint_name(3)]


def test_a_checkpoint_is_written_beside_others_files_of_its_name(tmp_path):
    """A step trained again whose old checkpoint folder holds only a user's files."""
    root = tmp_path / "checkpoints"
    (root / checkpoint_name(5)).mkdir(parents=True)
    (root / checkpoint_name(5) / "notes.txt").write_text("mine")
    write_steps(root, [5])
    assert verify_checkpoint(root / checkpoint_name(5))["step"] == 5
    assert (root / checkpoint_name(5) / "notes.txt").read_text() == "mine"
    assert not [p for p in root.iterdir() if p.name.startswith(TMP_PREFIX)]


@pytest.mark.parametrize("prefix", [DELETING_PREFIX, TMP_PREFIX])
def test_leftovers_of_an_interrupted_prune_or_write_keep_others_files(tmp_path, prefix):
    root = tmp_path / "checkpoints"
    write_steps(root, [1, 2])
    left = root / f"{prefix}{checkpoint_name(1)}"
    (root / checkpoint_name(1)).rename(left)
    (left / "grid.json").write_text("{}")
    remove_incomplete(root)
    kept = root / checkpoint_name(1) if prefix == DELETING_PREFIX else left
    assert sorted(p.name for p in kept.iterdir()) == ["grid.json"]
    assert [p.name for p in list_checkpoints(root)] == [checkpoint_name(2)]


def test_a_damaged_write_without_state_is_still_a_checkpoint_to_skip(tmp_path):
    root = tmp_path / "checkpoints"
    write_steps(root, [1, 2])
    (root / checkpoint_name(2) / "state.json").unlink()
    assert [p.name for p in list_checkpoints(root)] == [checkpoint_name(1), checkpoint_name(2)]


def test_a_grid_sampled_into_a_checkpoint_and_a_nested_run_survive_a_resume(train_tiny,
                                                                            tmp_path):
    """The probe's cases: ``diffmoe sample R/checkpoints/step_1 --out R/checkpoints/step_1/
    grid.png`` and a new run in ``R/checkpoints/step_1/myrun``, then ``--resume`` of R with
    keep_checkpoints=2 pruning step 1."""
    from diffmoe.cli import main
    from diffmoe.config import load_config
    from diffmoe.train import train

    run = train_tiny("train.ckpt_every=1", "train.keep_checkpoints=2")
    step1 = run / "checkpoints" / checkpoint_name(1)
    assert main(["sample", str(step1), "--num", "2", "--steps", "1", "--batch-size", "2",
                 "--out", str(step1 / "grid.png")]) == 0
    nested = step1 / "myrun"
    settings = ["train.steps=1", "sample.steps=1", "sample.num=2", "sample.batch_size=2"]
    train(load_config(ROOT / "configs" / "digits_tiny.yaml",
                      [f"train.out_dir={nested}", *settings]))
    nested_files = sorted(p.relative_to(nested) for p in nested.rglob("*"))
    train(load_config(run / "config.yaml", ["train.steps=3"]), resume=True)
    assert sorted(p.name for p in step1.iterdir()) == ["grid.json", "grid.png", "myrun"]
    assert sorted(p.relative_to(nested) for p in nested.rglob("*")) == nested_files
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == [
        checkpoint_name(2), checkpoint_name(3)]


def test_save_pretrained_keeps_files_it_did_not_write(train_tiny, tmp_path):
    from diffmoe.errors import DiffMoEError
    from diffmoe.hub import CARD_FILE, CONFIG_FILE, WEIGHTS_FILE, load_pretrained

    pretrained = load_pretrained(train_tiny())
    for name, text in ((CARD_FILE, "my notes\n"), (CONFIG_FILE, '{"mine": 1}\n'),
                       (WEIGHTS_FILE, "not weights\n")):
        folder = tmp_path / f"userdir-{name}"
        folder.mkdir()
        (folder / name).write_text(text)
        with pytest.raises(DiffMoEError, match=f"{name}' is not a file save_pretrained wrote"):
            pretrained.save_pretrained(folder)
        assert sorted(p.name for p in folder.iterdir()) == [name]
        assert (folder / name).read_text() == text
    # Its own card it replaces: saving twice works.
    other = pretrained.save_pretrained(tmp_path / "ours")
    pretrained.save_pretrained(other)
    assert (other / CARD_FILE).read_text().startswith("---\nlibrary_name: diffmoe\n")
