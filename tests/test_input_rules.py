"""Rules every input follows, each written once: the range of every integer setting and option
(config/ranges.py), ``~`` in every path, one notion of the classes of a folder, prompts in
UTF-8. The command-line rows of each are in tests/test_bad_inputs.py."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
from PIL import Image

from diffmoe.cli import build_parser, check_int_options, main
from diffmoe.config import Config, load_config
from diffmoe.config.keys import keys_of
from diffmoe.config.ranges import COMMAND_OPTION_RANGES, OPTION_RANGES, SEED, Range, check_int
from diffmoe.data.imagefolder import list_folder
from diffmoe.errors import ConfigError, DataError, DiffMoEError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "digits_tiny.yaml"
# The range each integer key declares (config/schema.py).
CONFIG_RANGES = {k.name: k.check for k in keys_of(Config) if isinstance(k.check, Range)}


def int_keys(cls: type, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += int_keys(tp, f"{prefix}{f.name}.")
        elif tp is int or tp == typing.Optional[int]:
            keys.append(f"{prefix}{f.name}")
    return keys


def test_every_integer_key_has_exactly_one_range():
    assert sorted(int_keys(Config)) == sorted(CONFIG_RANGES)


def test_every_integer_option_of_the_cli_has_a_range():
    """Each ``type=int`` option is a sampling setting (checked as its sample.* key; --num is
    one only for ``sample``) or has a range of its own."""
    from diffmoe.config import SampleConfig
    sampling = {f.name for f in dataclasses.fields(SampleConfig)} - {"num"}
    commands = build_parser()._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        ranged = {**OPTION_RANGES, **COMMAND_OPTION_RANGES.get(name, {})}
        for action in sub._actions:
            if action.type is int:
                as_setting = action.dest in sampling or (name, action.dest) == ("sample", "num")
                assert as_setting or action.dest in ranged, (name, action.dest)


@pytest.mark.parametrize("value, message", [
    (-1, "train.seed=-1 must be >= 0"),
    (2 ** 63, "train.seed=9223372036854775808 is more than 9223372036854775807"),
])
def test_the_range_check_says_its_limit(value, message):
    with pytest.raises(ConfigError, match=message):
        check_int("train.seed", value, SEED)
    check_int("train.seed", 2 ** 63 - 1, SEED)


def test_every_integer_key_is_checked_before_anything_is_built():
    for key, limit in CONFIG_RANGES.items():
        with pytest.raises(ConfigError, match=f"{key}={limit.high + 1} is more than"):
            load_config(CONFIG, [f"{key}={limit.high + 1}"])


def test_a_seed_beyond_64_bits_from_the_python_api(train_tiny):
    from diffmoe import DiffMoEPipeline
    pipe = DiffMoEPipeline.from_pretrained(train_tiny(), device="cpu")
    with pytest.raises(DiffMoEError, match="generator=1180591620717411303424 is more than"):
        pipe(class_labels=[0], generator=2 ** 70)
    with pytest.raises(DiffMoEError, match="num_inference_steps|sample.steps=100000000000 is "
                                           "more than 1000000"):
        pipe(class_labels=[0], num_inference_steps=10 ** 11)
    assert pipe.last is None


def test_options_are_checked_for_every_command():
    args = build_parser().parse_args(["cache-latents", "in", "out", "--vae", "v",
                                      "--shard-size", "0"])
    with pytest.raises(ConfigError, match="--shard-size 0 must be a positive integer"):
        check_int_options(args)


def test_tilde_is_the_home_directory_in_every_path(tmp_path, monkeypatch, train_tiny):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(CONFIG, ["train.out_dir=~/tilde", "data.path=~/images",
                               "data.cache_dir=~/cache", "data.vae=~/vae"])
    assert (cfg.train.out_dir, cfg.data.path, cfg.data.cache_dir, cfg.data.vae) == (
        f"{tmp_path}/tilde", f"{tmp_path}/images", f"{tmp_path}/cache", f"{tmp_path}/vae")
    run = train_tiny()
    monkeypatch.chdir(tmp_path / "..")
    home_run = tmp_path / "myrun"
    home_run.symlink_to(run)
    assert main(["sample", "~/myrun", "--num", "2", "--steps", "1", "--batch-size", "2",
                 "--out", "~/grid.png"]) == 0
    assert (tmp_path / "grid.png").is_file() and not (tmp_path / ".." / "~").exists()
    from diffmoe.hub import load_pretrained
    assert load_pretrained("~/myrun").step == 2


def image(path: Path, colour=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def test_hidden_entries_are_no_classes_and_no_images(tmp_path):
    image(tmp_path / "cat" / "0.png")
    image(tmp_path / "dog" / "0.png")
    image(tmp_path / ".ipynb_checkpoints" / "0.png")
    image(tmp_path / "cat" / "._0.png")  # macOS resource fork beside an image
    listing = list_folder(tmp_path)
    assert listing.classes == ["cat", "dog"]
    assert [p.name for p in listing.files] == ["0.png", "0.png"]


def test_one_count_of_classes_trains_a_folder_with_a_jupyter_folder(tmp_path):
    """The probe's case: with .ipynb_checkpoints/, num_classes=2 was refused "set 3" and 3
    "set 2"."""
    from diffmoe.train import train
    for label, colour in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
        for i in range(2):
            image(tmp_path / "images" / label / f"{i}.png", colour)
    (tmp_path / "images" / ".ipynb_checkpoints").mkdir()
    settings = [f"train.out_dir={tmp_path / 'run'}", "data.name=folder",
                f"data.path={tmp_path / 'images'}", "model.in_channels=3", "train.batch_size=4",
                "train.steps=1", "sample.steps=1", "sample.num=2", "sample.batch_size=2"]
    with pytest.raises(DataError, match="has 2 classes but model.num_classes=3; set "
                                        "model.num_classes=2"):
        train(load_config(CONFIG, [*settings, "model.num_classes=3"]))
    assert train(load_config(CONFIG, [*settings, "model.num_classes=2"])).step == 1


def test_a_limit_that_cuts_classes_counts_them_once(tmp_path):
    """data.limit keeping the first class only: one count, said by one check."""
    from diffmoe.train import train
    for label in ("a", "b"):
        for i in range(4):
            image(tmp_path / "images" / label / f"{i}.png")
    settings = [f"train.out_dir={tmp_path / 'run'}", "data.name=folder", "data.limit=4",
                f"data.path={tmp_path / 'images'}", "model.in_channels=3", "train.batch_size=4",
                "train.steps=1", "sample.steps=1", "sample.num=2", "sample.batch_size=2"]
    with pytest.raises(DataError, match="has 1 class within data.limit but model.num_classes=2"):
        train(load_config(CONFIG, [*settings, "model.num_classes=2"]))
    assert train(load_config(CONFIG, [*settings, "model.num_classes=1"])).step == 1


def test_a_prompt_that_is_not_utf8_from_the_python_api():
    from diffmoe.data.text_encoder import check_prompts
    with pytest.raises(ConfigError, match=r"prompt 'caf\\udce9 circle' is not valid UTF-8"):
        check_prompts(["a red circle", "caf\udce9 circle"])


def test_a_folder_of_hidden_entries_only_says_so(tmp_path):
    image(tmp_path / ".ipynb_checkpoints" / "0.png")
    with pytest.raises(DataError, match=r"holds only hidden entries \(e.g. '.ipynb_checkpoints'\)"):
        list_folder(tmp_path)
