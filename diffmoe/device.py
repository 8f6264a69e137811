"""Where the work runs and in which precision: the device a name stands for, TF32 for fp32
matmuls on CUDA, and bf16 autocast."""

from __future__ import annotations

import contextlib
import logging

import torch

from .config import DEVICES
from .errors import ConfigError

log = logging.getLogger(__name__)


def resolve_device(name: str | torch.device, option: str = "train.device") -> torch.device:
    """``auto`` (CUDA when there is one, else the CPU), ``cpu`` or ``cuda`` (a torch device is
    returned as it is); ``option`` names the setting in the error for anything else, or for CUDA
    on a machine without it."""
    if isinstance(name, torch.device):
        return name
    if name not in DEVICES:
        raise ConfigError(f"{option}={name!r} is not one of {list(DEVICES)}; use cuda for a GPU")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option}=cuda but no CUDA device is available; use {option}=cpu "
                          f"or auto")
    return torch.device(name)


def use_tf32(device: torch.device, enabled: bool) -> None:
    """On CUDA, let fp32 matmuls and convolutions run on TF32 tensor cores (``enabled``) or keep
    them in full fp32. Process-wide, as torch's switches are; nothing to do on the CPU."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    log.debug("TF32 for fp32 matmuls and convolutions: %s", "on" if enabled else "off")


def autocast(precision: str, device: torch.device):
    """bf16 autocast for ``precision=bf16``, nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
