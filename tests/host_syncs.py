"""Count the places where the host would wait for the device, on a CPU-only machine.

On a GPU, reading a tensor's value on the host (``.item()``, ``bool()``, ``.tolist()``, ``.cpu()``
...) or an op whose output size depends on the values (``nonzero``, boolean-mask indexing)
blocks until the device has caught up. On a CPU nothing blocks, so :func:`count_host_syncs`
patches those entry points and records, for each call, the innermost frame of the package that
made it. Frames in ``diffmoe/data/`` are left out: the data pipeline works on host tensors by
design (it indexes the dataset on the CPU before the batch is copied to the device).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Iterator

import torch

PACKAGE = Path(__file__).resolve().parents[1] / "diffmoe"
HOST_DATA = PACKAGE / "data"
READERS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy",
           "nonzero")


def _package_frame() -> str | None:
    """file:line of the innermost frame inside the package (outside its host-data code)."""
    frame = sys._getframe(2)
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if PACKAGE in path.parents:
            return None if HOST_DATA in path.parents else f"{path.relative_to(PACKAGE)}:" \
                                                          f"{frame.f_lineno}"
        frame = frame.f_back
    return None


@contextlib.contextmanager
def count_host_syncs() -> Iterator[list[str]]:
    """Within it, every host read of a tensor made by the package is appended (as file:line) to
    the list it yields."""
    calls: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in READERS}
    original_getitem = torch.Tensor.__getitem__
    original_nonzero = torch.nonzero

    def wrap(name):
        method = originals[name]

        def reader(self, *args, **kwargs):
            where = _package_frame()
            if where is not None:
                calls.append(f"{name} at {where}")
            return method(self, *args, **kwargs)
        return reader

    def getitem(self, index):
        masks = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in masks):
            where = _package_frame()
            if where is not None:
                calls.append(f"boolean mask at {where}")
        return original_getitem(self, index)

    def nonzero(*args, **kwargs):
        where = _package_frame()
        if where is not None:
            calls.append(f"torch.nonzero at {where}")
        return original_nonzero(*args, **kwargs)

    try:
        for name in READERS:
            setattr(torch.Tensor, name, wrap(name))
        torch.Tensor.__getitem__ = getitem
        torch.nonzero = nonzero
        yield calls
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)
        torch.Tensor.__getitem__ = original_getitem
        torch.nonzero = original_nonzero
