"""Sampling a trained model from Python, in the style of diffusers' pipelines::

    pipe = DiffMoEPipeline.from_pretrained("runs/mnist_diffmoe")  # a folder, run or checkpoint
    out = pipe(class_labels=[0, 1, 2], num_inference_steps=50, generator=0)
    out.images[0].save("zero.png")
    out.capacity.c_avg_infer                                       # Eq. 15

Every setting left as None is the model's own ``sample`` setting, exactly as ``diffmoe sample``
takes it when the option is not given, so the pipeline and the command give the same images for
the same checkpoint, seed and settings. In particular ``mode=None`` is the config's
``sample.mode``, whose ``auto`` is the paper's dynamic routing (Eq. 14) for a DiffMoE model.
Sampling is :func:`diffmoe.sample.generate`; prompts are encoded by
:func:`diffmoe.t2i.sample.encode_prompts`, latent samples decoded by the VAE of
:func:`diffmoe.data.sample_decoder` (unless ``output_type="latent"``), capacity measured by
:class:`diffmoe.capacity.CapacityMeter`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .capacity import activated_params
from .config import Config, SampleConfig
from .data import sample_decoder, to_uint8
from .device import resolve_device, use_tf32
from .diffusion import Objective, build_objective
from .errors import ConfigError
from .hub import Pretrained, load_pretrained
from .models import DiT
from .sample import Condition, generate, resolve_routing, sampling_settings
from .t2i.sample import encode_prompts

# PIL images; an (N, H, W, C) float array or an (N, C, H, W) float tensor in [0, 1]; or, for a
# latent model, its samples themselves (N, C, h, w), undecoded, in the model's latent scale.
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


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
    unit = images.clamp(-1, 1).add(1).div(2)  # (N, C, H, W) in [0, 1]
    return unit.permute(0, 2, 3, 1).numpy() if output_type == "np" else unit


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
                        device: str | torch.device = "auto", vae: Any = None
                        ) -> "DiffMoEPipeline":
        """Load a folder written by :meth:`save_pretrained`, a run directory (its newest intact
        checkpoint) or a checkpoint directory, with its ``ema`` (default) or ``raw`` weights, on
        ``device`` (``auto``: CUDA when there is one, as the CLI's ``--device``). ``vae`` (a
        diffusers AutoencoderKL or its folder) decodes a latent model's samples instead of the
        folder's ``vae/`` or the VAE its config names."""
        return cls(load_pretrained(path, weights, resolve_device(device, "device"), vae))

    @property
    def model(self) -> DiT:
        return self.pretrained.model

    @property
    def config(self) -> Config:
        return self.pretrained.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> "DiffMoEPipeline":
        """Move the model (and a loaded VAE at the next call) to ``device``."""
        self.model.to(resolve_device(device, "device"))
        self._decoder, self._decoder_loaded = None, False
        return self

    def __call__(self, class_labels: Optional[Union[int, Sequence[int], Tensor]] = None,
                 prompt: Optional[Union[str, Sequence[str]]] = None,
                 num_inference_steps: Optional[int] = None,
                 guidance_scale: Optional[float] = None, mode: Optional[str] = None,
                 threshold: Optional[float] = None, sampler: Optional[str] = None,
                 batch_size: Optional[int] = None,
                 generator: Optional[Union[int, torch.Generator]] = None,
                 output_type: str = "pil", num_images_per_prompt: int = 1,
                 progress: bool = False) -> PipelineOutput:
        """One image per class label (or ``num_images_per_prompt`` per prompt, for a text
        model). ``num_inference_steps``, ``guidance_scale`` (1 = no guidance), ``mode``
        (dynamic, threshold, static, auto), ``threshold`` (γ of ``mode="threshold"``),
        ``sampler`` and ``batch_size`` (DiffMoE's token pool) default to the model's ``sample``
        settings; ``generator``: a seed (the CLI's ``--seed``, default the settings' seed) or a
        torch.Generator on the model's device. Every argument is checked before sampling."""
        latent = self.config.data.name == "latents"
        if output_type not in OUTPUT_TYPES:
            raise ConfigError(f"output_type '{output_type}' is not one of {list(OUTPUT_TYPES)}")
        if output_type == "latent" and not latent:
            raise ConfigError(f"output_type='latent' is for latent models, and this one works in "
                              f"pixels (data.name={self.config.data.name}); use 'pt' or 'np'")
        chosen = {"steps": num_inference_steps, "cfg_scale": guidance_scale, "mode": mode,
                  "threshold": threshold, "sampler": sampler, "batch_size": batch_size,
                  "seed": generator if isinstance(generator, int) else None}
        s = sampling_settings(self.config, {k: v for k, v in chosen.items() if v is not None})
        routing = resolve_routing(self.model, s)
        condition = self.condition(class_labels, prompt, num_images_per_prompt)
        noise = self._generator(generator)
        decoder = self.decoder() if output_type != "latent" else None
        use_tf32(self.device, s.tf32)
        images, meter = generate(self.model, self.objective, condition, s, progress=progress,
                                 generator=noise)
        if decoder is not None:  # a latent model: decode with its VAE, as diffmoe sample does
            images = decoder(images)
        cap = meter.summary()
        self.last = CapacityReport(cap["c_avg_infer"], cap["per_layer"], cap["per_timestep"],
                                   activated_params(self.model, cap["c_avg_infer"]),
                                   self.model.num_params(), routing.mode)
        self.last_settings = s
        return PipelineOutput(convert_output(images, output_type), self.last, s)

    @property
    def objective(self) -> Objective:
        """The objective of the model's config (flow matching or DDPM)."""
        return build_objective(self.config)

    def condition(self, class_labels: Optional[Union[int, Sequence[int], Tensor]],
                  prompt: Optional[Union[str, Sequence[str]]], per_prompt: int = 1
                  ) -> Condition:
        """The labels, or the encoded prompts, each repeated ``per_prompt`` times; one error line
        for a condition this model does not take or a label outside its classes."""
        m = self.config.model
        if per_prompt < 1:
            raise ConfigError(f"num_images_per_prompt={per_prompt} must be a positive integer")
        if m.condition == "text":
            if class_labels is not None:
                raise ConfigError("this model is text-to-image and has no class labels; drop "
                                  "class_labels and pass prompt=['a red circle', ...]")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
            if not prompts:
                raise ConfigError("this model is text-to-image; say what to draw with "
                                  "prompt=['a red circle', ...]")
            index = torch.arange(len(prompts)).repeat_interleave(per_prompt)
            return encode_prompts(m, prompts, self.device)[index]
        if prompt is not None:
            raise ConfigError("this model is class-conditional and takes no prompt; choose "
                              f"classes with class_labels=[...] in 0..{m.num_classes - 1}")
        labels = self._labels(class_labels, m.num_classes)
        return labels.repeat_interleave(per_prompt)

    @staticmethod
    def _labels(class_labels: Optional[Union[int, Sequence[int], Tensor]], num_classes: int
                ) -> Tensor:
        if class_labels is None:
            raise ConfigError(f"this model is class-conditional; say what to draw with "
                              f"class_labels=[...] in 0..{num_classes - 1}")
        labels = torch.as_tensor(class_labels).reshape(-1)
        if labels.numel() == 0 or labels.is_floating_point() or labels.dtype == torch.bool:
            raise ConfigError(f"class_labels must be one or more integers in "
                              f"0..{num_classes - 1}, got {class_labels!r}")
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if bad.numel():
            raise ConfigError(f"class label {int(bad[0])} is outside 0..{num_classes - 1}, the "
                              f"classes of this model; pass labels in that range")
        return labels.long()

    def _generator(self, generator: Optional[Union[int, torch.Generator]]
                   ) -> Optional[torch.Generator]:
        """A torch.Generator to draw the noise from; None for a seed (taken by the settings)."""
        if generator is None or isinstance(generator, int):
            return None
        if not isinstance(generator, torch.Generator):
            raise ConfigError(f"generator must be a seed (int) or a torch.Generator, got "
                              f"{type(generator).__name__}")
        if generator.device.type != self.device.type:
            raise ConfigError(f"generator is on {generator.device} but the model on "
                              f"{self.device}; make it with torch.Generator(device="
                              f"'{self.device.type}')")
        return generator

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
