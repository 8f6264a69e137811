"""Sample-quality metrics on Inception pool3 features.

* FID (Heusel et al. 2017): ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^{1/2}), from the
  means and covariances of the two feature sets. Written here, not taken from torchmetrics,
  because torchmetrics' metric only accepts images, while reference statistics come cached or as
  ADM ``mu``/``sigma`` files; the trace of the matrix square root is computed as torchmetrics
  does, as the sum of square roots of the eigenvalues of S_r S_g.
* KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel, averaged over
  random subsets; the MMD itself is torchmetrics' ``poly_mmd``.
* Precision and recall (Kynkaanniemi et al. 2019): each set's manifold is the union of balls
  around its points with radius the distance to the k-th nearest neighbour (k = 3); precision is
  the share of generated points inside the real manifold, recall the share of real points inside
  the generated one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torchmetrics.image.kid import poly_mmd

from ..errors import DataError

log = logging.getLogger(__name__)

PR_NEIGHBOURS = 3
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_MIN_SUBSET = 2  # the unbiased MMD needs two features per subset
MIN_FID_SET = 2  # a covariance needs two samples
DISTANCE_CHUNK = 1024  # rows per block of pairwise distances


@dataclass
class FeatureStats:
    """A feature set summarised: mean (D,), covariance (D, D), both float64, the sample count,
    and the features themselves (N, D) when available (needed for KID and precision/recall)."""

    mu: Tensor
    sigma: Tensor
    num: Optional[int]  # None when a statistics file does not say
    features: Optional[Tensor] = None

    @classmethod
    def from_features(cls, features: Tensor) -> "FeatureStats":
        if features.shape[0] < 2:
            raise DataError(f"FID needs at least 2 images per set, got {features.shape[0]}; "
                            f"raise the number of samples")
        f64 = features.double()
        return cls(f64.mean(0), torch.cov(f64.t()), features.shape[0], features.float())


def covariance_warning(num: int, dim: int) -> Optional[str]:
    """With fewer samples than feature dimensions the covariance is rank-deficient: FID is then
    biased upwards and only comparable between runs with the same N."""
    if num <= dim:
        return (f"{num} samples for {dim}-d features: the covariance has rank < {dim}, so FID "
                f"is biased upwards; compare FIDs only at equal N (use N > {dim} for a "
                f"full-rank estimate)")
    return None


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    mu1, mu2, sigma1, sigma2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise DataError(f"feature statistics disagree in shape: mu {tuple(mu1.shape)} vs "
                        f"{tuple(mu2.shape)}, sigma {tuple(sigma1.shape)} vs "
                        f"{tuple(sigma2.shape)}")
    mean_term = (mu1 - mu2).square().sum()
    # Tr((S1 S2)^{1/2}) = sum of square roots of the eigenvalues of S1 S2, which equal those of
    # the symmetric PSD matrix S1^{1/2} S2 S1^{1/2}: two symmetric eigendecompositions, faster
    # and better conditioned than a general eigensolver on S1 S2.
    w1, v1 = torch.linalg.eigh(sigma1)
    root1 = (v1 * w1.clamp(min=0).sqrt()) @ v1.t()
    inner = root1 @ sigma2 @ root1
    sqrt_trace = torch.linalg.eigvalsh((inner + inner.t()) / 2).clamp(min=0).sqrt().sum()
    return float(mean_term + sigma1.trace() + sigma2.trace() - 2 * sqrt_trace)


def kernel_inception_distance(real: Tensor, fake: Tensor, subsets: int = KID_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE, seed: int = 0
                              ) -> tuple[float, float]:
    """KID mean and standard deviation over ``subsets`` random subsets. The subset size is capped
    at half the smaller set, so that subsets differ and the standard deviation means something
    (the estimator is unbiased, so its mean does not depend on the subset size)."""
    size = min(subset_size, real.shape[0] // 2, fake.shape[0] // 2)
    if size < KID_MIN_SUBSET:
        raise DataError(f"KID needs at least {2 * KID_MIN_SUBSET} features per set, got "
                        f"{real.shape[0]} real and {fake.shape[0]} generated")
    gen = torch.Generator().manual_seed(seed)
    real, fake = real.double(), fake.double()
    scores = torch.stack([
        poly_mmd(real[torch.randperm(real.shape[0], generator=gen)[:size]],
                 fake[torch.randperm(fake.shape[0], generator=gen)[:size]])
        for _ in range(subsets)])
    return float(scores.mean()), float(scores.std(unbiased=False))


def _pairwise_min_check(queries: Tensor, points: Tensor, radii: Tensor) -> Tensor:
    """For each query: is it within radius_j of some point j?"""
    inside = []
    for start in range(0, queries.shape[0], DISTANCE_CHUNK):
        d = torch.cdist(queries[start:start + DISTANCE_CHUNK], points)
        inside.append((d <= radii.unsqueeze(0)).any(1))
    return torch.cat(inside)


def knn_radii(points: Tensor, k: int = PR_NEIGHBOURS) -> Tensor:
    """Distance from each point to its k-th nearest other point."""
    if points.shape[0] <= k:
        raise DataError(f"precision/recall with k = {k} needs more than {k} samples per set, "
                        f"got {points.shape[0]}")
    radii = []
    for start in range(0, points.shape[0], DISTANCE_CHUNK):
        d = torch.cdist(points[start:start + DISTANCE_CHUNK], points)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # the smallest distance is the point itself
    return torch.cat(radii)


def precision_recall(real: Tensor, fake: Tensor, k: int = PR_NEIGHBOURS) -> tuple[float, float]:
    real, fake = real.double(), fake.double()
    precision = _pairwise_min_check(fake, real, knn_radii(real, k)).double().mean()
    recall = _pairwise_min_check(real, fake, knn_radii(fake, k)).double().mean()
    return float(precision), float(recall)


def min_set_size(with_features: bool) -> int:
    """The fewest images per set :func:`compare` accepts: two for FID alone (a reference of mean
    and covariance only), and with features enough for KID's half-set subsets and for
    precision/recall's nearest neighbours."""
    return max(2 * KID_MIN_SUBSET, PR_NEIGHBOURS + 1) if with_features else MIN_FID_SET


def check_set_sizes(reference: FeatureStats, num_generated: int, option: str = "--num") -> None:
    """Refuse, before any sample is drawn, a generated set of ``num_generated`` images (or a
    reference) too small for the metrics :func:`compare` will compute against ``reference``."""
    need = min_set_size(reference.features is not None)
    metrics = "FID, KID and precision/recall need" if need > MIN_FID_SET else "FID needs"
    if reference.num is not None and reference.num < need:
        raise DataError(f"the reference set has {reference.num} images and {metrics} at least "
                        f"{need} per set; use a larger reference")
    check_generated_size(num_generated, reference.features is not None, option)


def check_generated_size(num_generated: int, with_features: bool, option: str = "--num") -> None:
    """The generated set's part of :func:`check_set_sizes`, for when the reference is known to
    have features before it is read (a dataset or a folder), so nothing is computed first."""
    need = min_set_size(with_features)
    metrics = "FID, KID and precision/recall need" if need > MIN_FID_SET else "FID needs"
    if num_generated < need:
        raise DataError(f"{option} {num_generated}: {metrics} at least {need} images per set; "
                        f"use {option} {need} or more")


def _check_finite(stats: FeatureStats, name: str) -> None:
    if not (bool(torch.isfinite(stats.mu).all()) and bool(torch.isfinite(stats.sigma).all())):
        raise DataError(f"the feature statistics of {name} hold NaN or inf, so no metric is "
                        f"defined; recompute them (or regenerate the .npz)")


def compare(reference: FeatureStats, generated: FeatureStats, kid_seed: int = 0,
            names: tuple[str, str] = ("the reference set", "the generated set")) -> dict:
    """FID, KID, precision and recall of ``generated`` against ``reference`` (called ``names`` in
    errors). KID and precision/recall are None when the reference carries only mean and
    covariance. Statistics holding NaN or inf are refused, so every number is finite."""
    for stats, name in zip((reference, generated), names):
        _check_finite(stats, name)
    if generated.num is not None:
        check_set_sizes(reference, generated.num)
    result: dict = {"fid": frechet_distance(reference.mu, reference.sigma, generated.mu,
                                            generated.sigma),
                    "kid": None, "kid_std": None, "precision": None, "recall": None,
                    "num_reference": reference.num, "num_generated": generated.num,
                    "warnings": []}
    for num in (reference.num, generated.num):
        if num is None:
            continue
        warning = covariance_warning(num, generated.mu.shape[0])
        if warning and warning not in result["warnings"]:
            result["warnings"].append(warning)
    if reference.features is None or generated.features is None:
        result["warnings"].append("the reference has only mean and covariance (no features): "
                                  "KID and precision/recall are not computed")
        return result
    result["kid"], result["kid_std"] = kernel_inception_distance(
        reference.features, generated.features, seed=kid_seed)
    result["precision"], result["recall"] = precision_recall(reference.features,
                                                             generated.features)
    return result
