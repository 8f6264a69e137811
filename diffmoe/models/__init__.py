"""The diffusion transformers: :class:`DiT` (class labels) and :class:`TextDiT` (captions), with
the feed-forward variants of :mod:`.moe`. Nothing here imports from the packages above it
(data, diffusion, t2i, train, sample, evaluation, cli)."""

from ..config import ModelConfig
from .dit import DiT, DiTOutput
from .t2i import TextDiT


def build_model(cfg: ModelConfig, token_pool: str = "rank") -> DiT:
    """The class-conditional DiT, or the text-conditioned one for ``model.condition: text``;
    ``token_pool`` as for :class:`DiT`."""
    if cfg.condition == "text":
        return TextDiT(cfg, token_pool)
    return DiT(cfg, token_pool)


__all__ = ["DiT", "DiTOutput", "TextDiT", "build_model"]
