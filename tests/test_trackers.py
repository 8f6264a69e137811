"""``train.trackers`` (issue 21): TensorBoard and offline W&B receive every metrics.jsonl record,
the config and the sample grids, read back here with TensorBoard's own EventAccumulators and
from W&B's offline run file; a resumed run adds no duplicate steps. And the classes of the
training sample grids: spread over the whole range for models with more than 10 classes,
recorded in the run directory and kept on resume."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from diffmoe.config import load_config
from diffmoe.errors import ConfigError, DiffMoEError
from diffmoe.images import GRID_COLUMNS, grid_classes
from diffmoe.train import METRIC_FIELDS, Trainer, grid_conditions, train

ROOT = Path(__file__).resolve().parents[1]
FIELDS = sorted(set(METRIC_FIELDS) - {"step"})
TB = "train.trackers=[tensorboard]"


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def grid_pixels(run: Path, step: int) -> np.ndarray:
    return np.asarray(Image.open(run / "samples" / f"step_{step:08d}.png").convert("RGB"))


def legacy_events(run: Path):
    """TensorBoard's classic EventAccumulator over the run's TensorBoard folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"),
                           size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def plugin_events(run: Path):
    """The EventAccumulator TensorBoard's server reads with (every summary a tensor)."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    return acc


def plugin_values(acc, tag: str) -> list[tuple[int, object]]:
    from tensorboard.util import tensor_util

    return [(e.step, tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)]


def assert_tensorboard_matches(run: Path, grid_steps: list[int], config_steps: list[int]):
    """Every metrics.jsonl field is a scalar holding exactly that file's records (one per
    step), the grids are the PNGs of samples/, and the config text sits at ``config_steps``,
    as both accumulators read the event files."""
    recs = records(run)
    legacy, plugin = legacy_events(run), plugin_events(run)
    assert sorted(legacy.Tags()["scalars"]) == FIELDS
    for key in FIELDS:
        expected = [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in recs]
        assert [(e.step, e.value) for e in legacy.Scalars(key)] == expected, key
        assert [(s, float(v)) for s, v in plugin_values(plugin, key)] == expected, key
    images = legacy.Images("samples")
    assert [e.step for e in images] == grid_steps
    for event in images:
        shown = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
        assert np.array_equal(shown, grid_pixels(run, event.step))
    assert [s for s, _ in plugin_values(plugin, "samples")] == grid_steps
    config = plugin_values(plugin, "config/text_summary")
    assert [s for s, _ in config] == config_steps
    assert (run / "config.yaml").read_text() in config[-1][1].item().decode()


def test_tensorboard_holds_every_metric_the_sample_grids_and_the_config(tiny_config_path,
                                                                        tiny_overrides):
    run = train(load_config(tiny_config_path, tiny_overrides("tb") + [TB])).run_dir
    assert [r["step"] for r in records(run)] == [2, 4, 6]
    assert_tensorboard_matches(run, grid_steps=[3, 6], config_steps=[0])


def test_a_resumed_run_adds_no_duplicate_steps_to_tensorboard(tiny_config_path, tiny_overrides):
    """The run dies after logging steps 4 and 6 and drawing grid 6 but before its step-6
    checkpoint; it resumes from step 3 with another learning rate, so the replayed records
    differ from the dead run's: TensorBoard shows the replayed ones, each step once."""
    overrides = tiny_overrides("resumed") + [TB]
    run = train(load_config(tiny_config_path, overrides)).run_dir
    dead = records(run)
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    train(load_config(tiny_config_path, overrides + ["train.lr=0.003"]), resume=True,
          accept_changes=True)
    replayed = records(run)
    assert [r["lr"] for r in dead] == [1e-3] * 3 and [r["lr"] for r in replayed] == [
        1e-3, 3e-3, 3e-3]
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert_tensorboard_matches(run, grid_steps=[3, 6], config_steps=[0, 4])


def test_a_new_run_refuses_a_tensorboard_folder_holding_something(tiny_config_path,
                                                                  tiny_overrides):
    overrides = tiny_overrides("taken") + [TB]
    out = Path(load_config(tiny_config_path, overrides).train.out_dir)
    (out / "tensorboard").mkdir(parents=True)
    (out / "tensorboard" / "mine.txt").write_text("a note")
    with pytest.raises(DiffMoEError, match="already holds tensorboard/, which a new run writes"):
        train(load_config(tiny_config_path, overrides))
    assert (out / "tensorboard" / "mine.txt").read_text() == "a note"


def test_a_tracker_whose_package_is_missing_is_refused_before_any_work(
        tiny_config_path, tiny_overrides, monkeypatch):
    monkeypatch.setattr("diffmoe.trackers.package_installed", lambda name: name != "wandb")
    overrides = tiny_overrides("missing") + ["train.trackers=[tensorboard, wandb]"]
    with pytest.raises(ConfigError, match="needs the wandb package, which is not installed"):
        train(load_config(tiny_config_path, overrides))
    assert not Path(load_config(tiny_config_path, overrides).train.out_dir).exists()


def test_trackers_are_a_list_and_a_bare_name_is_a_list_of_one(tiny_config_path):
    def trackers(value):
        return load_config(tiny_config_path, [f"train.trackers={value}"]).train.trackers

    assert trackers("[tensorboard, wandb]") == ["tensorboard", "wandb"]
    assert trackers("tensorboard") == ["tensorboard"]
    assert trackers("[]") == [] and load_config(tiny_config_path).train.trackers == []


# -- W&B, offline ----------------------------------------------------------------------------

def no_network_prefix() -> list[str]:
    """A command prefix that runs a process in a network namespace of its own (no interface
    but a loopback that is down), or skip."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) to run W&B without a network")
    if subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode != 0:
        pytest.skip("this machine does not allow a network namespace (unshare -rn)")
    return ["unshare", "-rn"]


def train_offline(run: Path, *extra: str) -> None:
    argv = [*no_network_prefix(), sys.executable, "-m", "diffmoe", "train",
            "configs/digits_tiny.yaml", f"train.out_dir={run}", "train.steps=6",
            "train.log_every=2", "train.sample_every=3", "train.ckpt_every=3", "sample.steps=2",
            "sample.num=10", "sample.batch_size=10", "train.trackers=[wandb]", *extra]
    env = {**os.environ, "WANDB_MODE": "online"}  # the tracker is offline whatever this says
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def offline_runs(run: Path) -> list[Path]:
    return sorted((run / "wandb").glob("offline-run-*"))


def assert_wandb_matches(offline: Path, run: Path, metric_steps: list[int],
                         grid_steps: list[int]):
    from wandb_records import history, read_records, run_config

    run_id = offline.name.rsplit("-", 1)[1]
    found = read_records(offline / f"run-{run_id}.wandb")
    rows = history(found)
    by_step = {r["step"]: r for r in records(run)}
    assert sorted(s for s, row in rows.items() if "loss" in row) == metric_steps
    for step in metric_steps:
        expected = {k: pytest.approx(v, rel=1e-12) for k, v in by_step[step].items()
                    if k != "step"}
        assert {k: v for k, v in rows[step].items() if not k.startswith("samples.")} == expected
    assert sorted(s for s, row in rows.items() if "samples._type" in row) == grid_steps
    for step in grid_steps:
        png = (run / "samples" / f"step_{step:08d}.png").read_bytes()
        assert rows[step]["samples.sha256"] == hashlib.sha256(png).hexdigest()
        assert (offline / "files" / rows[step]["samples.path"]).read_bytes() == png
    config = {k: v for k, v in run_config(found).items() if not k.startswith("_")}
    assert config == yaml.safe_load((run / "config.yaml").read_text())


def test_wandb_runs_offline_without_a_network_and_holds_what_the_run_wrote(tmp_path):
    """Trained in a process that has no network: the offline run holds every metrics record
    (at its step), each grid (the PNG's bytes) and the config; the resumed run continues the
    same W&B run id in a new offline run that holds the steps it trained."""
    run = tmp_path / "run"
    train_offline(run)
    [first] = offline_runs(run)
    assert_wandb_matches(first, run, metric_steps=[2, 4, 6], grid_steps=[3, 6])
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    train_offline(run, "--resume")
    earlier, resumed = offline_runs(run)
    assert earlier == first and resumed.name.rsplit("-", 1)[1] == first.name.rsplit("-", 1)[1]
    assert_wandb_matches(resumed, run, metric_steps=[4, 6], grid_steps=[6])


# -- the classes of the sample grids ---------------------------------------------------------

@pytest.mark.parametrize("num_classes", [11, 100, 1000, 1001])
def test_grid_classes_spread_over_the_whole_range(num_classes):
    classes = grid_classes(num_classes, seed=0)
    assert len(classes) == GRID_COLUMNS
    for j, c in enumerate(classes):  # one class from each tenth of the range, in order
        assert num_classes * j // GRID_COLUMNS <= c < num_classes * (j + 1) // GRID_COLUMNS
    assert grid_classes(num_classes, seed=0) == classes


def test_grid_classes_are_every_class_of_a_small_model_and_vary_with_the_seed():
    assert grid_classes(10, seed=3) == list(range(10))
    assert grid_classes(4, seed=3) == [0, 1, 2, 3]
    assert grid_classes(1000, seed=0) != grid_classes(1000, seed=1)


def test_grids_of_a_many_class_model_show_the_classes_the_run_recorded(tiny_config_path,
                                                                       tiny_overrides):
    """A 100-class model: its grids' columns are grid_classes(100, seed), recorded in
    samples/grid_classes.json; a resume reads them from there."""
    overrides = tiny_overrides("many") + ["model.num_classes=100", "train.seed=7"]
    cfg = load_config(tiny_config_path, overrides)
    run = train(cfg).run_dir
    recorded = json.loads((run / "samples" / "grid_classes.json").read_text())["classes"]
    assert recorded == grid_classes(100, seed=7) and max(recorded) >= 90
    (run / "samples" / "grid_classes.json").write_text(json.dumps({"classes": [5, 50, 95]}))
    trainer = Trainer(load_config(tiny_config_path, overrides + ["train.steps=9"]), resume=True)
    try:
        assert trainer.run.grid_classes == [5, 50, 95]
        labels = grid_conditions(trainer.cfg, trainer.dataset, trainer.device,
                                 trainer.run.grid_classes)
    finally:
        trainer.close()
    assert labels.tolist() == [5, 50, 95, 5, 50, 95, 5, 50, 95, 5]  # sample.num = 10
