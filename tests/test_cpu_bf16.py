"""bf16 on the CPU: autocast runs there, and a CPU without bf16 units says once that it
emulates them."""

import logging

import torch

from diffmoe import device as device_module
from diffmoe.device import autocast


def _autocast_twice(caplog) -> list[str]:
    device_module._warn_emulated_bf16.cache_clear()
    with caplog.at_level(logging.WARNING, logger="diffmoe.device"):
        for _ in range(2):
            with autocast("bf16", torch.device("cpu")):
                out = torch.ones(2, 3) @ torch.ones(3, 2)
            assert out.dtype == torch.bfloat16
    device_module._warn_emulated_bf16.cache_clear()
    return [r.getMessage() for r in caplog.records if "bf16 units" in r.getMessage()]


def test_a_cpu_without_bf16_units_is_told_once(monkeypatch, caplog):
    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: False)
    messages = _autocast_twice(caplog)
    assert len(messages) == 1 and "use precision fp32" in messages[0]


def test_a_cpu_with_bf16_units_runs_bf16_silently(monkeypatch, caplog):
    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: True)
    assert _autocast_twice(caplog) == []


def test_fp32_never_asks_about_bf16_units(monkeypatch):
    def asked():
        raise AssertionError("fp32 looked for bf16 units")

    monkeypatch.setattr(device_module, "cpu_has_bf16", asked)
    with autocast("fp32", torch.device("cpu")):
        assert (torch.ones(2, 3) @ torch.ones(3, 2)).dtype == torch.float32
