"""A trained model as a Hub-style folder that others can share and load::

    <folder>/
        config.json         the full config the model was trained with (Config.to_dict()),
                            without the training machine's paths (without_machine_paths)
        model.safetensors   its weights (EMA by default), the DiffMoE thresholds included; the
                            metadata holds the format ("pt"), the diffmoe version, the training
                            step, which weights they are, the capacity the card reports and
                            the class names (``id2label``), if the training data named them
        README.md           a short model card: the config, C_avg_infer, the training steps
        vae/                a latent model's VAE, a diffusers AutoencoderKL folder (unless
                            saved with include_vae=False: config.json then names it)

A latent model's config.json records its latent space (``data.scale_factor``, ``shift_factor``,
``downsampling``) and not where its training cache was (``data.path`` is empty), so the folder
samples images anywhere: with its ``vae/``, or the VAE passed as ``vae=``.

This is the layout of huggingface_hub's ``ModelHubMixin`` (``save_pretrained`` /
``from_pretrained``, ``config.json`` + ``model.safetensors``, a model card with YAML front
matter), written without importing huggingface_hub, which is not a pinned dependency and must
download nothing here: such a folder can be uploaded as it is (``huggingface_hub.upload_folder``)
and a Hub repository, once downloaded (``huggingface_hub.snapshot_download``), loads as a folder.

:func:`load_pretrained` reads such a folder, a run directory (its newest intact checkpoint) or a
checkpoint directory. Every problem is one :class:`~diffmoe.errors.DiffMoEError` line, and a
failing save writes nothing.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import shutil
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError, safe_open

from .checkpoint import (
    STATE_FILE,
    LoadedCheckpoint,
    load_state_dict_checked,
    open_checkpoint,
    state_dict_mismatch,
)
from .config import WEIGHTS, Config, config_from_dict
from .data.latents import (
    VAE_CLASS,
    LatentSpace,
    as_vae,
    check_vae_fits,
    finished_index,
    latent_space,
    vae_downsampling,
    vae_reference,
)
from .errors import CheckpointError, ConfigError
from .fileio import atomic_write, atomic_write_text, save_safetensors
from .models import DiT, build_model
from .paths import user_path
from .run import METRICS_FILE

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
CARD_START = b"---\nlibrary_name: diffmoe\n"  # how every card begins (its front matter)
VAE_DIR = "vae"  # a latent model's AutoencoderKL inside the folder, as in diffusers pipelines
SAFETENSORS_FORMAT = "pt"  # the "format" metadata entry transformers and diffusers write
CAPACITY_LOGGED = "logged in training (C dynamic inference would use on the last logged batch)"
FOLDER_KINDS = "a folder written by save_pretrained, a run directory or a checkpoint directory"
VERSION = importlib.metadata.version("diffmoe")  # recorded in the weights' metadata


@dataclass
class Pretrained:
    """A trained model with what its folder or checkpoint records about it.

    model: the DiT in eval mode with the chosen weights (DiffMoE thresholds included).
    config: the full config it was trained with (objective, data, sample settings).
    step: training steps behind the weights. weights: ``ema`` or ``raw``.
    source: the folder or checkpoint directory that was read.
    c_avg_infer: the capacity the model card reports (Eq. 15), None when not measured, and
    capacity_note: how it was measured.
    vae: what decodes a latent model's samples: the folder's ``vae/``, or what was passed to
    load it (a folder path or an AutoencoderKL); None: its config's ``data.vae`` or its cache's.
    id2label: the name of each class, as the training data named them (a folder's class
    subfolders, MNIST's digits), empty when it named none.
    """

    model: DiT = dataclasses.field(repr=False)
    config: Config = dataclasses.field(repr=False)
    step: int
    weights: str
    source: Path
    c_avg_infer: Optional[float] = None
    capacity_note: str = ""
    vae: Any = dataclasses.field(default=None, repr=False)
    id2label: dict[int, str] = dataclasses.field(default_factory=dict, repr=False)

    def save_pretrained(self, directory: str | Path, include_vae: bool = True, vae: Any = None
                        ) -> Path:
        """Write the folder (see the module docstring); returns its path."""
        return save_pretrained(self, directory, include_vae, vae)


def unknown_fields(cls: type, data: dict, prefix: str = "") -> list[str]:
    """Dotted keys of ``data`` that the dataclass ``cls`` (a config section) has no field for."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    found = []
    for key, value in data.items():
        if key not in names:
            found.append(f"{prefix}{key}")
        elif dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            found += unknown_fields(hints[key], value, f"{prefix}{key}.")
    return found


def _read_config(folder: Path) -> Config:
    path = folder / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"'{path}' cannot be read as JSON ({exc}); save the folder again "
                              f"with save_pretrained") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"'{path}' holds no config mapping; save the folder again with "
                              f"save_pretrained")
    unknown = unknown_fields(Config, data)
    if unknown:
        raise ConfigError(f"'{path}' has config field '{unknown[0]}' that diffmoe {VERSION} "
                          f"does not know (a newer version's folder?); upgrade diffmoe, or "
                          f"remove the field if the folder was edited")
    return config_from_dict(data)


def _read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"'{folder}' has {CONFIG_FILE} but no {WEIGHTS_FILE}; copy the "
                              f"weights beside it or save the folder again with save_pretrained")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"'{path}' is not a readable safetensors file ({exc}); save the "
                              f"folder again with save_pretrained") from None


def _load_folder(folder: Path, weights: str, device: torch.device | str) -> Pretrained:
    cfg = _read_config(folder)
    tensors, meta = _read_weights(folder)
    model = build_model(cfg.model)
    parts = state_dict_mismatch(tensors, model.state_dict(), f"in the model of its {CONFIG_FILE}")
    if parts:
        raise CheckpointError(f"'{folder / WEIGHTS_FILE}' does not fit its {CONFIG_FILE} "
                              f"({'; '.join(parts)}); keep the two files of one save_pretrained "
                              f"together")
    held = meta.get("weights", weights)
    if held != weights:
        raise ConfigError(f"'{folder}' holds the {held} weights only, not {weights}; load "
                          f"weights='{held}', or the run directory it was saved from")
    model.load_state_dict(tensors)
    capacity = json.loads(meta.get("capacity") or "{}")
    vae = folder / VAE_DIR if (folder / VAE_DIR).is_dir() else None
    names = json.loads(meta.get("id2label") or "{}")
    return Pretrained(model.to(device).eval(), cfg, int(meta.get("step", 0)), held, folder,
                      capacity.get("c_avg_infer"), capacity.get("note", ""), vae,
                      {int(k): v for k, v in names.items()})


def checkpoint_config(ckpt: LoadedCheckpoint) -> Config:
    """The config a checkpoint was trained with (validated)."""
    try:
        return config_from_dict(ckpt.state["config"])
    except (KeyError, TypeError):
        raise CheckpointError(f"checkpoint '{ckpt.path}' has no usable config in state.json; it "
                              f"is damaged") from None


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors of ``tensors`` that hold a NaN or an infinity."""
    return [name for name, t in tensors.items()
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def _checkpoint_model(ckpt: LoadedCheckpoint, weights: str, device: torch.device | str) -> DiT:
    """The model a checkpoint was trained with, with its ``ema`` or ``raw`` weights."""
    model = build_model(checkpoint_config(ckpt).model)
    tensors = ckpt.tensors("ema" if weights == "ema" else "model")
    bad = nonfinite_tensors(tensors)
    if bad:
        raise CheckpointError(f"checkpoint '{ckpt.path}' holds NaN or inf in {len(bad)} of its "
                              f"{weights} tensors (first: {bad[0]}); use an earlier checkpoint "
                              f"of the run")
    load_state_dict_checked(model, tensors, f"'{ckpt.path}'")
    return model.to(device).eval()


def _logged_capacity(checkpoint: Path) -> Optional[float]:
    """The last ``dynamic_capacity`` in the metrics of the run a checkpoint belongs to."""
    metrics = checkpoint.parent.parent / METRICS_FILE
    if not metrics.is_file():
        return None
    values = [json.loads(line).get("dynamic_capacity") for line in
              metrics.read_text().splitlines() if line.strip()]
    values = [v for v in values if v is not None]
    return float(values[-1]) if values else None


def _missing(path: Path) -> CheckpointError:
    text = str(path)
    hub_id = text.count("/") == 1 and not text.startswith((".", "/"))
    hint = (f" (a Hub id must be downloaded first, e.g. with huggingface_hub.snapshot_download"
            f"('{text}'), and the folder passed)" if hub_id else "")
    return CheckpointError(f"'{path}' does not exist; pass {FOLDER_KINDS}{hint}")


def load_pretrained(path: str | Path, weights: str = "ema", device: torch.device | str = "cpu",
                    vae: Any = None) -> Pretrained:
    """The model of a folder written by :func:`save_pretrained`, of a run directory (its newest
    intact checkpoint) or of a checkpoint directory, with its ``ema`` or ``raw`` weights (a
    folder holds the one set it was saved with), in eval mode on ``device``. ``vae`` (a folder
    or an AutoencoderKL) decodes a latent model's samples instead of the one it names."""
    path = Path(user_path(str(path)))
    if weights not in WEIGHTS:
        raise ConfigError(f"weights '{weights}' must be one of {list(WEIGHTS)}")
    if not path.exists():
        raise _missing(path)
    if (path / CONFIG_FILE).is_file():
        p = _load_folder(path, weights, device)
        return p if vae is None else dataclasses.replace(p, vae=vae)
    if not ((path / STATE_FILE).is_file() or (path / "checkpoints").is_dir()):
        found = f" (it has {WEIGHTS_FILE} but no {CONFIG_FILE})" if (
            path / WEIGHTS_FILE).is_file() else ""
        raise CheckpointError(f"'{path}' is not {FOLDER_KINDS}{found}; pass one of those")
    ckpt = open_checkpoint(path)
    model = _checkpoint_model(ckpt, weights, device)
    logged = _logged_capacity(ckpt.path)
    names = (ckpt.state.get("data") or {}).get("class_names") or []
    return Pretrained(model, checkpoint_config(ckpt), int(ckpt.state["step"]), weights,
                      ckpt.path, logged, CAPACITY_LOGGED if logged is not None else "", vae,
                      dict(enumerate(names)))


def is_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by :func:`save_pretrained` (not a run or checkpoint)."""
    return (Path(path) / CONFIG_FILE).is_file()


def read_config(path: str | Path) -> Config:
    """The config of a folder, or of a run's newest checkpoint or a checkpoint directory."""
    return _read_config(Path(path)) if is_folder(path) else checkpoint_config(
        open_checkpoint(path))


def load_model(path: str | Path, weights: str = "ema", device: torch.device | str = "cpu"
               ) -> DiT:
    """The DiT of :func:`load_pretrained` alone, in eval mode."""
    return load_pretrained(path, weights, device).model


def model_card(p: Pretrained) -> str:
    """README.md of a folder: YAML front matter (the Hub's model-card metadata) and a table of
    the config's main entries, C_avg_infer and the training steps."""
    m, moe = p.config.model, p.config.model.moe
    experts = "" if moe.type == "dense" else f", {moe.num_experts} experts, capacity {moe.capacity}"
    condition = (f"{m.num_classes} classes" if m.condition == "class" else
                 f"text ({m.text.encoder})")
    capacity = ("not measured" if p.c_avg_infer is None else
                f"{p.c_avg_infer:.4f}, {p.capacity_note}")
    rows = [("feed-forward", f"{moe.type}{experts}"),
            ("backbone", f"depth {m.depth}, width {m.hidden_size}, {m.num_heads} heads, patch "
                         f"{m.patch_size}, input {m.in_channels}x{m.input_size}x{m.input_size}"),
            ("condition", condition), ("objective", p.config.objective.type),
            ("parameters", f"{p.model.num_params():,}"), ("training steps", str(p.step)),
            ("weights", p.weights), ("C_avg_infer (Eq. 15)", capacity)]
    d = p.config.data
    if d.name == "latents":
        vae = f"`{VAE_DIR}/`" if not d.vae else f"not included (`{d.vae}`)"
        rows.insert(3, ("latent space", f"VAE latents scaled by {d.scale_factor:g} (shift "
                                        f"{d.shift_factor:g}), {d.downsampling}x downsampling; "
                                        f"VAE {vae}"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return (f"{CARD_START.decode()}tags:\n- diffmoe\n- diffusion\n- mixture-of-experts\n"
            f"---\n\n# DiffMoE model\n\nA diffusion transformer trained with diffmoe "
            f"(DiffMoE, arXiv 2503.14487); the full config is in {CONFIG_FILE}.\n\n"
            f"| | |\n|---|---|\n{table}\n\n```python\nfrom diffmoe import DiffMoEPipeline\n\n"
            f"pipe = DiffMoEPipeline.from_pretrained(\"path/to/this/folder\")\n```\n")


def _vae_name(source: Any) -> str:
    """What a folder records of a VAE it does not hold: its path, or the name it was loaded by."""
    if isinstance(source, (str, Path)):
        return str(Path(source).resolve())
    return str(getattr(source.config, "_name_or_path", "") or "")


def _latent_record(p: Pretrained, include_vae: bool, vae: Any) -> tuple[dict, Any]:
    """The data section a latent model's folder records: its latent space and, with
    ``include_vae=False``, its VAE's path; not its cache. And the AutoencoderKL to write as
    ``vae/`` (None with ``include_vae=False``): ``vae``, else the model's own."""
    data = dataclasses.asdict(p.config.data)
    source = vae if vae is not None else p.vae if p.vae is not None else vae_reference(data)
    missing = isinstance(source, (str, Path)) and not str(source)
    known = LatentSpace.of_config(data) is not None or finished_index(data["path"]) is not None
    if missing and (include_vae or not known):
        raise ConfigError(f"this latent model's VAE is not known (no data.vae, no latent cache at "
                          f"'{data['path']}'); pass save_pretrained(..., vae=DIR), the diffusers "
                          f"AutoencoderKL folder it was trained with")
    model = None if missing or (known and not include_vae) else as_vae(source)
    space = latent_space(data, model)
    if model is not None:
        check_vae_fits(model, space, p.config.model.in_channels, f"'{source}'"
                       if isinstance(source, (str, Path)) else "passed")
        space = dataclasses.replace(space, downsampling=vae_downsampling(model))
    data.update(path="", vae="" if include_vae or missing else _vae_name(source),
                scale_factor=space.scale, shift_factor=space.shift,
                downsampling=space.downsampling)
    return data, model if include_vae else None


def without_machine_paths(cfg: Config) -> dict:
    """The config as a folder records it, with nothing of the machine it was trained on: the
    run's ``train.out_dir`` and an absolute ``data.cache_dir`` become their defaults, and a
    folder dataset's ``data.path`` its folder's name (which says what it was trained on). A
    latent model's ``data`` is recorded by :func:`_latent_record`; a ``data.vae`` the folder
    does not hold stays, since loading needs it."""
    config, defaults = cfg.to_dict(), Config()
    config["train"]["out_dir"] = defaults.train.out_dir
    if Path(config["data"]["cache_dir"]).is_absolute():
        config["data"]["cache_dir"] = defaults.data.cache_dir
    if config["data"]["name"] == "folder":
        config["data"]["path"] = Path(config["data"]["path"]).name
    return config


def _check_vae_target(directory: Path, include_vae: bool) -> None:
    """Refuse to leave or overwrite a ``vae/`` that is not this save's to write."""
    target = directory / VAE_DIR
    if not target.exists():
        return
    if not include_vae:
        raise ConfigError(f"'{target}' holds the VAE of an earlier save, which loading the "
                          f"folder would use; delete it, or save with include_vae=True or to "
                          f"a new folder")
    try:
        kind = json.loads((target / CONFIG_FILE).read_text()).get("_class_name")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        kind = None
    if kind != VAE_CLASS:
        raise ConfigError(f"'{target}' exists and is not the {VAE_CLASS} folder of an earlier "
                          f"save, and save_pretrained writes the VAE there; move it or save to a "
                          f"new folder")


def _write_vae(vae: Any, directory: Path) -> None:
    """``vae`` as a diffusers folder at ``directory/vae``, written beside it and then swapped in,
    so that a failed write leaves the earlier one."""
    target, fresh, old = (directory / VAE_DIR, directory / f".{VAE_DIR}.tmp",
                          directory / f".{VAE_DIR}.old")
    for leftover in (fresh, old):
        shutil.rmtree(leftover, ignore_errors=True)
    vae.save_pretrained(str(fresh), safe_serialization=True)
    if target.exists():
        target.rename(old)
    fresh.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _written_here(path: Path) -> bool:
    """Whether the file at ``path`` is one :func:`save_pretrained` writes (so it may be
    replaced): a card beginning as every card does, a config.json of the config's sections,
    weights whose metadata names the diffmoe version."""
    try:
        if path.name == CARD_FILE:
            with open(path, "rb") as fh:
                return fh.read(len(CARD_START)) == CARD_START
        if path.name == CONFIG_FILE:
            data = json.loads(path.read_text())
            return isinstance(data, dict) and set(data) == set(Config().to_dict())
        with safe_open(str(path), framework="pt") as fh:
            return "diffmoe_version" in (fh.metadata() or {})
    except (OSError, ValueError, SafetensorError):
        return False


def save_pretrained(p: Pretrained, directory: str | Path, include_vae: bool = True,
                    vae: Any = None) -> Path:
    """Write ``p`` as a folder (see the module docstring): the weights first and ``config.json``,
    which marks the folder as loadable, last. A latent model's folder records its latent space
    and holds its VAE (``vae``, a folder or an AutoencoderKL, else its own) as ``vae/``, or with
    ``include_vae=False`` names it only. Refuses, writing nothing, a path that is a file, a run
    or a checkpoint directory, a folder holding a README.md, config.json or model.safetensors
    it did not write, and a VAE that is not to be had or does not fit the model."""
    directory = Path(user_path(str(directory)))
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"'{directory}' is a file; save_pretrained writes a folder, pass a "
                          f"directory path")
    if (directory / STATE_FILE).exists() or (directory / "checkpoints").exists():
        raise ConfigError(f"'{directory}' is a run or checkpoint directory; save the folder "
                          f"somewhere else")
    for name in (WEIGHTS_FILE, CARD_FILE, CONFIG_FILE):
        if os.path.lexists(directory / name) and not _written_here(directory / name):
            raise ConfigError(f"'{directory / name}' is not a file save_pretrained wrote, and it "
                              f"would be replaced; move it away or save the folder somewhere "
                              f"else")
    config, vae_model = without_machine_paths(p.config), None
    if p.config.data.name == "latents":
        _check_vae_target(directory, include_vae)
        config["data"], vae_model = _latent_record(p, include_vae, vae)
    elif vae is not None:
        raise ConfigError(f"vae= decodes a latent model, and this model works in pixels "
                          f"(data.name={p.config.data.name}); drop vae=")
    tensors = {k: v.detach().cpu().contiguous() for k, v in p.model.state_dict().items()}
    capacity = {"c_avg_infer": p.c_avg_infer, "note": p.capacity_note}
    meta = {"format": SAFETENSORS_FORMAT, "diffmoe_version": VERSION, "step": str(p.step),
            "weights": p.weights, "capacity": json.dumps(capacity),
            "id2label": json.dumps({str(k): v for k, v in p.id2label.items()})}
    config_text = json.dumps(config, indent=2) + "\n"
    card = model_card(dataclasses.replace(p, config=config_from_dict(config)))
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_safetensors(tensors, tmp, meta))
    if vae_model is not None:
        _write_vae(vae_model, directory)
    atomic_write_text(directory / CARD_FILE, card)
    atomic_write_text(directory / CONFIG_FILE, config_text)
    return directory
