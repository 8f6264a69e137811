"""Sampling a trained model, shaped like diffusers' ``DiTPipeline``; the one way in for Python
and for ``diffmoe sample`` / ``diffmoe eval``::

    pipe = DiffMoEPipeline.from_pretrained("runs/mnist_diffmoe")  # a folder, run or checkpoint
    out = pipe(class_labels=[0, 1, 2], num_inference_steps=50, generator=0)
    out.images[0].save("zero.png")
    out.capacity.c_avg_infer                                       # Eq. 15
    pipe.get_label_ids(["cats"])                                   # a folder-trained model

Every setting left as None is the model's own ``sample`` setting, exactly as ``diffmoe sample``
takes it when the option is not given, so the pipeline and the command give the same images for
the same checkpoint, seed and settings (the command draws through :meth:`DiffMoEPipeline.draw`).
In particular ``mode=None`` is the config's ``sample.mode``, whose ``auto`` is the paper's
dynamic routing (Eq. 14) for a DiffMoE model. Sampling is :func:`diffmoe.sample.generate`;
prompts are encoded by :func:`diffmoe.data.text_encoder.encode_prompts` (imported only for a
text model, so loading a class model imports no transformers), latent samples decoded by the VAE
of :func:`diffmoe.data.sample_decoder` (unless ``output_type="latent"``), capacity measured by
:class:`diffmoe.capacity.CapacityMeter`. Every bad argument is one :class:`DiffMoEError` line
naming the argument, raised before anything is sampled; settings that work but are probably not
meant (a token pool of one image, a threshold under which every expert takes every token) are
reported with ``warnings.warn`` as :class:`~diffmoe.errors.CapacityWarning`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .capacity import CapacityMeter, activated_params
from .config import Config, SampleConfig
from .config.ranges import IMAGES, SAMPLING_STEPS, SEED, Range, check_int
from .data import sample_decoder, to_uint8
from .device import resolve_device, use_tf32
from .diffusion import Objective, build_objective
from .diffusion.samplers import Generators
from .errors import CapacityWarning, ConfigError
from .fileio import write_json
from .hub import Pretrained, load_pretrained, read_config
from .images import GRID_COLUMNS, save_grid
from .models import DiT
from .sample import (
    Condition,
    Spelling,
    capacity_warnings,
    generate,
    generate_batches,
    option_name,
    parse_labels,
    recorded_settings,
    resolve_routing,
    sampling_settings,
    summary_path,
)

log = logging.getLogger(__name__)

# PIL images; an (N, H, W, C) float array or an (N, C, H, W) float tensor in [0, 1]; or, for a
# latent model, its samples themselves (N, C, h, w), undecoded, in the model's latent scale.
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# The weights' dtypes a pipeline samples in (torch_dtype=), and the sample.precision of each.
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16"}
# The pipeline's names of the sampling settings that it does not call by their config names.
ARGUMENTS = {"steps": "num_inference_steps", "cfg_scale": "guidance_scale", "seed": "generator"}
# Settings a call may pass in ``sample_settings`` (the rest have arguments of their own, or are
# the pipeline's: weights and torch_dtype at from_pretrained, num from the labels).
EXTRA_SETTINGS = ("ddim_eta", "ode_rtol", "ode_atol", "sde_noise", "guidance_channels",
                  "precision", "tf32", "compile")


def argument_name(setting: str, value: Any = None) -> str:
    """How the pipeline names a sampling setting in messages: ``steps`` →
    ``num_inference_steps``; with a value, ``mode='threshold'``."""
    name = ARGUMENTS.get(setting, setting)
    return name if value is None else f"{name}={value!r}"


def in_words_of(exc: ConfigError, name: Spelling) -> ConfigError:
    """A config error about ``sample.<key>=...`` with each key named as ``name`` does."""
    return ConfigError(re.sub(r"sample\.(\w+)=", lambda m: name(m.group(1)) + "=", str(exc)))


@dataclass
class CapacityReport:
    """What the MoE layers spent in one pipeline call (paper §5).

    c_avg_infer: C_avg_infer (Eq. 15), the mean over routed model forwards of C (Eq. 9);
    per_layer: C of each MoE layer, averaged over the forwards; per_step: one
    ``{"t": flow time (0 noise, 1 data), "capacity": C}`` per sampler step;
    activated_params: parameters a token activates at c_avg_infer (Eq. 40), of total_params;
    mode: the routing the layers used (``dynamic``, ``threshold``, ``static`` or ``predictor``).
    """

    c_avg_infer: float
    per_layer: list[float]
    per_step: list[dict]
    activated_params: float
    total_params: int
    mode: str


@dataclass
class PipelineOutput:
    """images: PIL images (``output_type="pil"``), an (N, H, W, C) float32 array in [0, 1]
    (``"np"``), an (N, C, H, W) tensor in [0, 1] (``"pt"``), or a latent model's undecoded
    samples, (N, C, h, w) in its latent scale (``"latent"``); in the order of the labels or
    prompts. capacity: what the MoE layers spent; settings: the sampling settings used, as
    ``diffmoe sample`` records them."""

    images: Union[list[Image.Image], np.ndarray, Tensor]
    capacity: CapacityReport
    settings: SampleConfig


def to_pil(images: Tensor) -> list[Image.Image]:
    """(N, C, H, W) in [-1, 1] → PIL images (grey for one channel), pixels as the PNG grids
    round them."""
    pixels = to_uint8(images).cpu()
    if pixels.shape[1] == 1:
        return [Image.fromarray(p[0].numpy()) for p in pixels]
    return [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]


def convert_output(images: Tensor, output_type: str) -> Union[list[Image.Image], np.ndarray,
                                                               Tensor]:
    """Samples (images in [-1, 1], or latents) as ``output_type`` asks (:data:`OUTPUT_TYPES`)."""
    if output_type == "latent":
        return images
    if output_type == "pil":
        return to_pil(images)
    unit = images.float().clamp(-1, 1).add(1).div(2)  # (N, C, H, W) in [0, 1]
    return unit.permute(0, 2, 3, 1).numpy() if output_type == "np" else unit


def _integer(name: str, value: Any, r: Range) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    check_int(name, int(value), r)
    return int(value)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} must be finite")
    return float(value)


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {value!r}")
    return value


# Each argument that names a sampling setting: its setting and the check of its type.
SETTING_ARGUMENTS: dict[str, tuple[str, Callable[[str, Any], Any]]] = {
    "num_inference_steps": ("steps", lambda n, v: _integer(n, v, SAMPLING_STEPS)),
    "guidance_scale": ("cfg_scale", _number),
    "mode": ("mode", _text),
    "threshold": ("threshold", _number),
    "sampler": ("sampler", _text),
    "batch_size": ("batch_size", lambda n, v: _integer(n, v, IMAGES)),
}


@dataclass
class DiffMoEPipeline:
    """A trained model ready to sample: the model with its config (:class:`~diffmoe.hub.Pretrained`)
    and its objective; the VAE decoder of a latent model is loaded at the first call. ``last``:
    the capacity report of the latest call, which :meth:`save_pretrained` writes into the card."""

    pretrained: Pretrained
    last: Optional[CapacityReport] = None
    last_settings: Optional[SampleConfig] = None
    _decoder: Optional[Callable[[Tensor], Tensor]] = field(default=None, repr=False)
    _decoder_loaded: bool = field(default=False, repr=False)

    @classmethod
    def from_pretrained(cls, path: str | Path, weights: str = "ema",
                        device: str | torch.device = "auto", vae: Any = None,
                        torch_dtype: Optional[torch.dtype] = None) -> "DiffMoEPipeline":
        """Load a folder written by :meth:`save_pretrained`, a run directory (its newest intact
        checkpoint) or a checkpoint directory, with its ``ema`` (default) or ``raw`` weights, on
        ``device`` (``auto``: CUDA when there is one, as the CLI's ``--device``), its weights in
        ``torch_dtype`` (``torch.float32``, the default, or ``torch.bfloat16``: then the
        forwards run under bf16 autocast, ``sample.precision=bf16``). ``vae`` (a diffusers
        AutoencoderKL or its folder) decodes a latent model's samples instead of the folder's
        ``vae/`` or the VAE its config names."""
        if torch_dtype is not None and torch_dtype not in DTYPES:
            raise ConfigError(f"torch_dtype={torch_dtype!r} is not one diffmoe samples in; "
                              f"pass one of {list(DTYPES)}")
        pretrained = load_pretrained(path, weights, resolve_device(device, "device"), vae)
        if torch_dtype is not None:
            pretrained.model.to(torch_dtype)
        return cls(pretrained)

    @classmethod
    def for_settings(cls, path: str | Path, overrides: dict, device: str | torch.device,
                     vae: Any = None, name: Spelling = argument_name
                     ) -> tuple["DiffMoEPipeline", SampleConfig]:
        """The pipeline of ``path`` and its ``sample`` settings updated with ``overrides``, the
        settings checked (in the words of ``name``) before any weights are read, the weights the
        settings name loaded: how ``diffmoe sample`` and ``diffmoe eval`` open a model."""
        device = resolve_device(device, "--device")
        cfg = read_config(path)
        s = sampling_settings(cfg, overrides, name)
        use_tf32(device, s.tf32)
        return cls.from_pretrained(path, s.weights, device, vae), s

    @property
    def model(self) -> DiT:
        return self.pretrained.model

    @property
    def config(self) -> Config:
        return self.pretrained.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def objective(self) -> Objective:
        """The objective of the model's config (flow matching or DDPM)."""
        return build_objective(self.config)

    @property
    def id2label(self) -> dict[int, str]:
        """Class index → the name the training data gave it (a folder's class subfolders,
        MNIST's digits); empty for a model whose data named no classes, or a text model."""
        return dict(self.pretrained.id2label)

    @property
    def labels(self) -> dict[str, int]:
        """Class name → index, as diffusers' ``DiTPipeline.labels``."""
        return {name: index for index, name in self.pretrained.id2label.items()}

    def get_label_ids(self, label: Union[str, Sequence[str]]) -> list[int]:
        """The class indices of class names (``pipe.get_label_ids(["cats", "dogs"])``), for
        ``class_labels``; one error line for a name the model does not know."""
        names = [label] if isinstance(label, str) else list(label)
        known = self.labels
        if not known:
            raise ConfigError(f"this model's training data named no classes (data.name="
                              f"{self.config.data.name}); pass class_labels as indices in "
                              f"0..{self.config.model.num_classes - 1}")
        for name in names:
            if not isinstance(name, str) or name not in known:
                shown = sorted(known)[:10]
                raise ConfigError(f"{name!r} is not a class of this model; its classes are "
                                  f"{shown}{' ...' if len(known) > len(shown) else ''}")
        return [known[name] for name in names]

    def to(self, device: str | torch.device) -> "DiffMoEPipeline":
        """Move the model (and a loaded VAE at the next call) to ``device``."""
        self.model.to(resolve_device(device, "device"))
        self._decoder, self._decoder_loaded = None, False
        return self

    # long: diffusers' DiTPipeline signature (its arguments first) and ours, each documented
    def __call__(self, class_labels: Optional[Union[int, Sequence[int], Tensor]] = None,
                 guidance_scale: Optional[float] = None,
                 generator: Optional[Union[int, torch.Generator, Sequence[torch.Generator]]]
                 = None,
                 num_inference_steps: Optional[int] = None, output_type: str = "pil",
                 return_dict: bool = True, latents: Optional[Tensor] = None, *,
                 prompt: Optional[Union[str, Sequence[str]]] = None,
                 num_images_per_prompt: int = 1, mode: Optional[str] = None,
                 threshold: Optional[float] = None, sampler: Optional[str] = None,
                 batch_size: Optional[int] = None,
                 sample_settings: Optional[Mapping[str, Any]] = None,
                 progress: bool = True) -> Union[PipelineOutput, tuple]:
        """One image per class label (or ``num_images_per_prompt`` per prompt, for a text
        model), as diffusers' ``DiTPipeline``: ``class_labels`` are class indices (names go
        through :meth:`get_label_ids`); ``guidance_scale`` (1 = no guidance) and
        ``num_inference_steps`` default to the model's ``sample`` settings; ``generator``: a
        seed (the CLI's ``--seed``, default the settings' seed), one torch.Generator drawn batch
        after batch, or a list of one per image (each image's noise its own, whatever its
        batch), on the model's device; ``output_type``: ``pil``, ``np``, ``pt`` or ``latent``;
        ``return_dict=False`` returns ``(images,)``; ``latents``: the starting noise, (N, C, H,
        W) for N images. Ours: ``mode`` (dynamic, threshold, static, auto), ``threshold`` (γ of
        ``mode="threshold"``), ``sampler`` and ``batch_size`` (DiffMoE's token pool) default to
        the model's settings; ``sample_settings``: other ``sample.*`` settings by name
        (:data:`EXTRA_SETTINGS`); ``progress``: a tqdm bar over the denoising steps. Every
        argument is checked before sampling."""
        if output_type not in OUTPUT_TYPES:
            raise ConfigError(f"output_type {output_type!r} is not one of {list(OUTPUT_TYPES)}")
        if output_type == "latent" and self.config.data.name != "latents":
            raise ConfigError(f"output_type='latent' is for latent models, and this one works in "
                              f"pixels (data.name={self.config.data.name}); use 'pt' or 'np'")
        if not isinstance(return_dict, bool):
            raise ConfigError(f"return_dict must be True or False, got {return_dict!r}")
        given = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                 "mode": mode, "threshold": threshold, "sampler": sampler,
                 "batch_size": batch_size}
        overrides = {SETTING_ARGUMENTS[k][0]: SETTING_ARGUMENTS[k][1](k, v)
                     for k, v in given.items() if v is not None}
        overrides.update(self._extra_settings(sample_settings))
        condition = self.condition(class_labels, prompt, num_images_per_prompt)
        num = condition.shape[0]
        seed, noise_from = self._generator(generator, num)
        overrides.update(num=num, **({} if seed is None else {"seed": seed}))
        s = self.settings(overrides)
        start = self._latents(latents, num)
        images, report = self.draw(condition, s, generator=noise_from, noise=start,
                                   progress=progress, decode=output_type != "latent")
        images = convert_output(images, output_type)
        return PipelineOutput(images, report, s) if return_dict else (images,)

    def settings(self, overrides: dict, name: Spelling = argument_name) -> SampleConfig:
        """The model's ``sample`` settings updated with ``overrides`` and checked, every error
        in the words of ``name`` (the pipeline's arguments by default); a model loaded in
        bfloat16 samples under bf16 autocast."""
        if self.dtype != torch.float32:
            overrides = {"precision": DTYPES[self.dtype], **overrides}
        try:
            return sampling_settings(self.config, overrides, name)
        except ConfigError as exc:
            raise in_words_of(exc, name) from None

    def draw(self, condition: Condition, s: SampleConfig, *,
             generator: Optional[Generators] = None, noise: Optional[Tensor] = None,
             progress: bool = True, decode: bool = True, name: Spelling = argument_name
             ) -> tuple[Tensor, CapacityReport]:
        """Sample one image per entry of ``condition`` with resolved settings ``s``
        (:meth:`settings`): images in [-1, 1] on the CPU (a latent model's decoded by its VAE,
        unless ``decode`` is False) and the capacity report, kept as :attr:`last`. Settings
        that are probably not meant are warned of (:class:`CapacityWarning`) in the words of
        ``name``."""
        routing = resolve_routing(self.model, s, name)
        decoder = self.decoder() if decode else None
        use_tf32(self.device, s.tf32)
        images, meter = generate(self.model, self.objective, condition, s, progress=progress,
                                 generator=generator, noise=noise)
        if decoder is not None:  # a latent model: decode with its VAE, as diffmoe sample does
            images = decoder(images)
        cap = meter.summary()
        for text in capacity_warnings(self.model, routing, s.batch_size, cap["c_avg_infer"],
                                      name):
            warnings.warn(text, CapacityWarning, stacklevel=3)
        self.last = CapacityReport(cap["c_avg_infer"], cap["per_layer"], cap["per_timestep"],
                                   activated_params(self.model, cap["c_avg_infer"]),
                                   self.model.num_params(), routing.mode)
        self.last_settings = s
        return images, self.last

    def batches(self, condition: Condition, s: SampleConfig, *,
                meter: Optional[CapacityMeter] = None, batches: Optional[Sequence[int]] = None,
                progress: bool = True) -> Iterator[tuple[Tensor, Condition]]:
        """:meth:`draw` batch by batch, undecoded, for a caller that consumes each batch as it
        comes (``diffmoe eval``: its share of the batches under torchrun, see
        :func:`diffmoe.sample.generate_batches`)."""
        return generate_batches(self.model, self.objective, condition, s, progress=progress,
                                meter=meter, batches=batches)

    def condition(self, class_labels: Optional[Union[int, Sequence[int], Tensor]],
                  prompt: Optional[Union[str, Sequence[str]]], per_prompt: int = 1
                  ) -> Condition:
        """The labels, or the encoded prompts, each repeated ``per_prompt`` times; one error line
        for a condition this model does not take or a label outside its classes."""
        m = self.config.model
        per_prompt = _integer("num_images_per_prompt", per_prompt, IMAGES)
        if m.condition == "text":
            if class_labels is not None:
                raise ConfigError("this model is text-to-image and has no class labels; drop "
                                  "class_labels and pass prompt=['a red circle', ...]")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
            if not prompts or not all(isinstance(p, str) for p in prompts):
                raise ConfigError("this model is text-to-image; say what to draw with "
                                  "prompt=['a red circle', ...]")
            from .data.text_encoder import encode_prompts  # transformers: text models only

            index = torch.arange(len(prompts)).repeat_interleave(per_prompt)
            return encode_prompts(m, prompts, self.device)[index]
        if prompt is not None:
            raise ConfigError("this model is class-conditional and takes no prompt; choose "
                              f"classes with class_labels=[...] in 0..{m.num_classes - 1}")
        return self._labels(class_labels, m.num_classes).repeat_interleave(per_prompt)

    def _labels(self, class_labels: Optional[Union[int, Sequence[int], Tensor]],
                num_classes: int) -> Tensor:
        expected = f"class_labels=[...] in 0..{num_classes - 1}"
        if class_labels is None:
            raise ConfigError(f"this model is class-conditional; say what to draw with "
                              f"{expected}")
        if isinstance(class_labels, Tensor):
            if class_labels.is_floating_point() or class_labels.is_complex() or \
                    class_labels.dtype == torch.bool:
                raise ConfigError(f"class_labels must be integers, got a {class_labels.dtype} "
                                  f"tensor")
            values = class_labels.reshape(-1).tolist()
        elif isinstance(class_labels, (int, np.integer, str)):
            values = [class_labels]
        elif isinstance(class_labels, (list, tuple, range, np.ndarray)):
            values = np.asarray(class_labels, dtype=object).reshape(-1).tolist()
        else:
            raise ConfigError(f"class_labels must be an integer, a list of integers or an "
                              f"integer tensor, got {type(class_labels).__name__}")
        for v in values:
            if isinstance(v, str):
                raise ConfigError(f"class_labels takes class indices, not the name {v!r}; "
                                  f"turn names into indices with pipe.get_label_ids([{v!r}])")
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ConfigError(f"class_labels must be one or more integers in "
                                  f"0..{num_classes - 1}, got {v!r}")
        if not values:
            raise ConfigError(f"class_labels must be one or more integers in "
                              f"0..{num_classes - 1}, got none")
        bad = [int(v) for v in values if not 0 <= v < num_classes]
        if bad:
            raise ConfigError(f"class label {bad[0]} is outside 0..{num_classes - 1}, the "
                              f"classes of this model; pass labels in that range")
        return torch.tensor([int(v) for v in values], dtype=torch.long)

    def _generator(self, generator: Any, num: int
                   ) -> tuple[Optional[int], Optional[Generators]]:
        """(the seed, or None) and (what the noise is drawn from, or None for the seed's)."""
        if generator is None:
            return None, None
        if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
            return _integer("generator", generator, SEED), None
        many = isinstance(generator, (list, tuple))
        generators = list(generator) if many else [generator]
        for g in generators:
            if not isinstance(g, torch.Generator):
                raise ConfigError(f"generator must be a seed (int), a torch.Generator or a list "
                                  f"of one per image, got {type(g).__name__}")
            if g.device.type != self.device.type:
                raise ConfigError(f"generator is on {g.device} but the model on {self.device}; "
                                  f"make it with torch.Generator(device='{self.device.type}')")
        if many and len(generators) != num:
            raise ConfigError(f"generator is a list of {len(generators)} generators for {num} "
                              f"images; pass one per image, or a single generator")
        return None, generators if many else generator

    def _latents(self, latents: Optional[Tensor], num: int) -> Optional[Tensor]:
        """The starting noise, checked: (num, C, H, W) finite floats."""
        if latents is None:
            return None
        m = self.config.model
        shape = (num, m.in_channels, m.input_size, m.input_size)
        if not isinstance(latents, Tensor) or not latents.is_floating_point():
            raise ConfigError(f"latents must be a float tensor of shape {shape}, got "
                              f"{type(latents).__name__}")
        if tuple(latents.shape) != shape:
            raise ConfigError(f"latents has shape {tuple(latents.shape)} but {num} images of "
                              f"this model start from noise of shape {shape}")
        if not bool(torch.isfinite(latents).all()):
            raise ConfigError("latents holds NaN or inf; pass finite starting noise")
        return latents.float()

    @staticmethod
    def _extra_settings(settings: Optional[Mapping[str, Any]]) -> dict:
        if settings is None:
            return {}
        unknown = [k for k in settings if k not in EXTRA_SETTINGS]
        if unknown:
            raise ConfigError(f"sample_settings has '{unknown[0]}', which is none of "
                              f"{list(EXTRA_SETTINGS)} (the other settings have arguments)")
        return dict(settings)

    def decoder(self) -> Optional[Callable[[Tensor], Tensor]]:
        """The VAE decoder of a latent model (loaded once), None for a pixel-space model."""
        if not self._decoder_loaded:
            self._decoder = sample_decoder(asdict(self.config.data), self.device,
                                           self.pretrained.vae, self.config.model.in_channels)
            self._decoder_loaded = True
        return self._decoder

    def save_pretrained(self, directory: str | Path, include_vae: bool = True, vae: Any = None
                        ) -> Path:
        """Write the model as a Hub-style folder (:func:`diffmoe.hub.save_pretrained`): a latent
        model's with its VAE as ``vae/`` (``vae``, else its own), or with ``include_vae=False``
        its VAE named only; the card reports the capacity of the latest call, if any."""
        p, s = self.pretrained, self.last_settings
        if self.last is not None and s is not None:
            note = (f"mode {self.last.mode}, {s.sampler} {s.steps} steps, guidance "
                    f"{s.cfg_scale:g}, sampling batch {s.batch_size}")
            p = replace(p, c_avg_infer=self.last.c_avg_infer, capacity_note=note)
        return p.save_pretrained(directory, include_vae, vae)


@contextlib.contextmanager
def warnings_logged() -> Iterator[None]:
    r"""Warnings raised inside (the pipeline's :class:`CapacityWarning`\ s) logged as warnings,
    each once, as the commands report them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CapacityWarning)
        yield
    for warning in caught:
        log.warning("%s", warning.message)


def sample_grid(path: str | Path, overrides: dict, out: str | Path,
                labels: Optional[str] = None, device: str | torch.device = "auto",
                measure: Optional[Callable[[Tensor, Tensor], dict]] = None,
                vae: Any = None) -> dict:
    """The ``diffmoe sample`` command for a class model, through the pipeline: a PNG grid at
    ``out`` and a JSON summary beside it (:func:`diffmoe.sample.summary_path`; the caller has
    checked both may be written). Settings are the model's ``sample`` config updated with
    ``overrides`` (checked, in the words of the command's options, before the weights are
    read); ``labels`` as ``--labels`` gives them (:func:`diffmoe.sample.parse_labels`).
    ``measure(images, labels)``, if given, reads the samples (in [-1, 1]) and returns entries
    for the summary (``--judge``: the MNIST judge's class consistency). ``vae`` (a folder)
    decodes a latent model's samples instead of its own. Capacity warnings are logged."""
    pipe, s = DiffMoEPipeline.for_settings(path, overrides, device, vae, option_name)
    y = parse_labels(labels, s.num, pipe.config.model.num_classes, s.seed)
    pipe.decoder()  # a latent model's VAE is found (or its absence reported) before sampling
    with warnings_logged():
        images, report = pipe.draw(y, s, name=option_name)
    cfg, out = pipe.config.model, Path(out)
    nrow = (GRID_COLUMNS if cfg.num_classes >= GRID_COLUMNS and s.num % GRID_COLUMNS == 0
            else None)
    save_grid(images, out, nrow=nrow, upscale=2)
    summary = {
        "checkpoint": str(pipe.pretrained.source), "step": pipe.pretrained.step,
        "image": str(out), "settings": recorded_settings(s, report.mode), "labels": y.tolist(),
        "c_avg_infer": report.c_avg_infer, "capacity_per_layer": report.per_layer,
        "activated_params": report.activated_params, "total_params": report.total_params,
        **(measure(images, y) if measure is not None else {}),
    }
    write_json(summary_path(out), summary)
    return summary
