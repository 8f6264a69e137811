"""Where the work runs and in which precision: the device a name stands for, TF32 for fp32
matmuls on CUDA, deterministic kernels, and bf16 autocast."""

from __future__ import annotations

import contextlib
import functools
import logging
import os

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


# cuBLAS is deterministic only with one of these workspace settings, read from the environment
# when cuBLAS is first used (NVIDIA's cuBLAS guide, "Results reproducibility"; torch checks for
# the same two under torch.use_deterministic_algorithms).
CUBLAS_CONFIG_VAR = "CUBLAS_WORKSPACE_CONFIG"
DETERMINISTIC_CUBLAS_CONFIGS = (":4096:8", ":16:8")


def use_deterministic(device: torch.device, option: str = "train.deterministic") -> None:
    """Deterministic kernels only (``torch.use_deterministic_algorithms(True)``; an op without
    one raises), process-wide as torch's switch is. On CUDA cuBLAS also needs
    ``CUBLAS_WORKSPACE_CONFIG`` before its first use: set here to the first of
    :data:`DETERMINISTIC_CUBLAS_CONFIGS` when unset and CUDA not yet initialised; a
    :class:`ConfigError` naming ``option`` when it is set to another value, or unset once CUDA is
    initialised (cuBLAS may then already have read it)."""
    if device.type == "cuda":
        _deterministic_cublas(os.environ, torch.cuda.is_initialized(), option)
    torch.use_deterministic_algorithms(True)
    log.info("deterministic algorithms: on (%s)", option)


def _deterministic_cublas(environ, cuda_initialised: bool, option: str) -> None:
    value = environ.get(CUBLAS_CONFIG_VAR)
    wanted = DETERMINISTIC_CUBLAS_CONFIGS[0]
    if value in DETERMINISTIC_CUBLAS_CONFIGS:
        return
    if value is not None:
        raise ConfigError(f"{option}=true needs {CUBLAS_CONFIG_VAR}={wanted} (or "
                          f"{DETERMINISTIC_CUBLAS_CONFIGS[1]}), but the environment sets it to "
                          f"{value!r}; unset it or set it to {wanted}")
    if cuda_initialised:
        raise ConfigError(f"{option}=true needs {CUBLAS_CONFIG_VAR}={wanted} before cuBLAS is "
                          f"first used, and CUDA is already initialised in this process; set "
                          f"{CUBLAS_CONFIG_VAR}={wanted} in the environment before starting it")
    environ[CUBLAS_CONFIG_VAR] = wanted
    log.info("%s=%s set for %s", CUBLAS_CONFIG_VAR, wanted, option)


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls in hardware (AVX512-BF16 or AMX, as oneDNN, which
    runs CPU bf16 matmuls, reports it); elsewhere bf16 is emulated, usually slower than fp32."""
    mkldnn_ops = getattr(torch.ops, "mkldnn", None)
    check = getattr(mkldnn_ops, "_is_mkldnn_bf16_supported", None)
    return bool(torch.backends.mkldnn.is_available() and check is not None and check())


@functools.cache
def _warn_emulated_bf16() -> None:
    log.warning("precision bf16 on a CPU without bf16 units (AVX512-BF16 or AMX): its matmuls "
                "are emulated and usually slower than fp32; use precision fp32 on this machine")


def autocast(precision: str, device: torch.device):
    """bf16 autocast for ``precision=bf16``, nothing for fp32. On the CPU, bf16 matmuls run on
    its bf16 units where it has them (:func:`cpu_has_bf16`); a CPU without says so once."""
    if precision == "bf16":
        if device.type == "cpu" and not cpu_has_bf16():
            _warn_emulated_bf16()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
