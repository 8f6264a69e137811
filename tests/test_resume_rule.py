"""The rule of resume: every change is either refused with its reason or applied and logged as
a warning; nothing is recorded in the run directory (config.yaml, config_history/) before the
resume is accepted; a run is never trained backwards; a moved end of a cosine schedule is an
optimisation change; a dataset whose images changed is refused."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from PIL import Image

from diffmoe.config import load_config
from diffmoe.errors import DiffMoEError
from diffmoe.train import train

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "digits_tiny.yaml"


def snapshot(run: Path) -> dict:
    """Every file of the run but the log, with its bytes."""
    return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != "train.log"}


def resume(run: Path, *overrides: str, accept: bool = False):
    return train(load_config(run / "config.yaml", [f"train.out_dir={run}", *overrides]),
                 resume=True, accept_changes=accept)


@pytest.fixture
def copy_of(train_tiny, tmp_path):
    def make(*overrides: str) -> Path:
        return Path(shutil.copytree(train_tiny(*overrides), tmp_path / "copy"))
    return make


def test_a_refused_resume_records_nothing(copy_of):
    run = copy_of()
    resume(run, "train.steps=3", "train.log_every=1", accept=True)  # a history to keep
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").mkdir()
    before = snapshot(run)
    with pytest.raises(DiffMoEError, match="metrics.jsonl' is a directory"):
        resume(run, "train.steps=5", "train.log_every=2")
    assert snapshot(run) == before


def test_training_backwards_is_refused_and_the_same_end_trains_nothing(copy_of):
    run = copy_of()
    before = snapshot(run)
    with pytest.raises(DiffMoEError, match="is at step 2 .* train.steps=1 is below it"):
        resume(run, "train.steps=1")
    assert snapshot(run) == before
    result = resume(run)
    assert result.step == 2 and result.last_checkpoint == run / "checkpoints" / "step_00000002"


def test_every_accepted_change_is_a_warning(copy_of, caplog):
    run = copy_of()
    with caplog.at_level(logging.WARNING, logger="diffmoe"):
        resume(run, "train.steps=3", "train.log_every=1")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("changed settings" in w and "train.log_every (5 in the checkpoint, 1 now)" in w
               and "train.steps (2 in the checkpoint, 3 now)" in w for w in warned), warned


def test_moving_the_end_of_a_cosine_schedule_needs_accept_changes(copy_of, caplog):
    run = copy_of("train.lr_schedule=cosine", "train.steps=4", "train.ckpt_every=2")
    shutil.rmtree(run / "checkpoints" / "step_00000004")  # stopped at step 2 of 4
    before = snapshot(run)
    with pytest.raises(DiffMoEError, match=r"train.steps \(4 in the checkpoint, 8 now\); the "
                                           r"learning rate of step 3 goes from 0.0005 to "
                                           r"0.000854; add --accept-changes"):
        resume(run, "train.steps=8")
    assert snapshot(run) == before
    with caplog.at_level(logging.WARNING, logger="diffmoe"):
        assert resume(run, "train.steps=8", accept=True).step == 8
    assert any("goes from 0.0005 to 0.000854" in r.getMessage() for r in caplog.records
               if r.levelno == logging.WARNING)


def folder_run(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    for label, colour in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
        (images / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), tuple(c + 10 * i for c in colour)).save(
                images / label / f"{i}.png")
    return train(load_config(CONFIG, [
        f"train.out_dir={tmp_path / 'run'}", "data.name=folder", f"data.path={images}",
        "model.in_channels=3", "model.num_classes=2", "train.batch_size=4", "train.steps=2",
        "sample.steps=1", "sample.num=2", "sample.batch_size=2"])).run_dir


@pytest.mark.parametrize("change, said", [
    (lambda d: (d / "dog" / "2.png").unlink(), "held 6 images then and 5 now"),
    (lambda d: Image.new("RGB", (9, 9), 0).save(d / "dog" / "2.png"),
     "held 6 images, but not the same ones"),
    (lambda d: (d / "dog" / "2.png").rename(d / "cat" / "9.png"),
     "held 6 images, but not the same ones"),
])
def test_a_folder_whose_images_changed_is_refused(tmp_path, change, said):
    run = folder_run(tmp_path)
    change(tmp_path / "images")
    before = snapshot(run)
    with pytest.raises(DiffMoEError, match=f"trained with different data: data.path .*{said}"):
        resume(run, "train.steps=3")
    assert snapshot(run) == before


def test_a_folder_as_it_was_resumes(tmp_path):
    run = folder_run(tmp_path)
    assert resume(run, "train.steps=3").step == 3


def test_a_resume_never_advises_another_architecture(tmp_path):
    """The data does not fit the checkpoint's model: the fix is other data, not another model
    (which a resume refuses)."""
    from diffmoe.data import build_dataset
    from diffmoe.errors import ConfigError
    from diffmoe.train import check_data_matches_model
    cfg = load_config(CONFIG, ["model.input_size=16"])
    with pytest.raises(ConfigError) as new_run:
        check_data_matches_model(cfg, build_dataset("digits", "train", 40))
    assert "set model.input_size=8" in str(new_run.value)
    with pytest.raises(ConfigError) as resumed:
        check_data_matches_model(cfg, build_dataset("digits", "train", 40), tmp_path / "ckpt")
    assert "model." not in str(resumed.value).split(";", 1)[1]
    assert "give it 1-channel 16x16 data" in str(resumed.value)


def test_a_moved_folder_of_the_same_images_resumes_with_a_warning(tmp_path, caplog):
    run = folder_run(tmp_path)
    moved = tmp_path / "moved"
    (tmp_path / "images").rename(moved)
    with caplog.at_level(logging.WARNING, logger="diffmoe"):
        assert resume(run, "train.steps=3", f"data.path={moved}").step == 3
    assert any(f"data.path ('{tmp_path / 'images'}' in the checkpoint, '{moved}' now)"
               in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    (moved / "dog" / "2.png").unlink()
    with pytest.raises(DiffMoEError, match="held 6 images then and 5 now"):
        resume(run, "train.steps=4", f"data.path={moved}")


def test_a_digits_run_still_refuses_a_data_change(copy_of):
    run = copy_of()
    with pytest.raises(DiffMoEError, match=r"different data: data.limit \(0 in the checkpoint"):
        resume(run, "train.steps=3", "data.limit=100")
