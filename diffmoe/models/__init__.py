"""The diffusion transformer :class:`DiT`, conditioned on class labels or captions
(:mod:`.condition`), with the feed-forward variants of :mod:`.moe`. Nothing here imports from the
packages above it (data, diffusion, t2i, train, sample, evaluation, cli)."""

from ..config import ModelConfig
from .condition import TextCondition
from .dit import DiT, DiTOutput


def build_model(cfg: ModelConfig, token_pool: str = "rank", initialize: bool = True) -> DiT:
    """The DiT of ``cfg``, conditioned as ``cfg.condition`` says; ``token_pool`` and
    ``initialize`` as for :class:`DiT`."""
    return DiT(cfg, token_pool, initialize)


__all__ = ["DiT", "DiTOutput", "TextCondition", "build_model"]
