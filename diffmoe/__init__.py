"""DiffMoE: diffusion transformers whose feed-forward layers are mixtures of experts that choose
tokens from a batch-level global pool (arXiv 2503.14487).

Comments cite the paper by equation number (Eq. N, the paper's own) and by section (paper §N, the
sections of the summary listed at the top of docs/paper-to-code.md)."""

from .config import Config, load_config
from .models import DiT, build_model

__version__ = "0.1.0"
__all__ = ["Config", "DiT", "build_model", "load_config", "__version__"]
