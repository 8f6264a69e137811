"""Samples saved as an ``.npz`` in the ADM evaluator's layout (``arr_0``: (N, H, W, C) uint8,
``arr_1``: labels), written batch by batch so the images never have to be in memory together,
into a temporary file renamed into place when complete."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format
from torch import Tensor


class NpzSampleWriter:
    def __init__(self, path: str | Path, num: int, height: int, width: int, channels: int):
        self.path = Path(path)
        self.shape = (num, height, width, channels)
        self.written = 0
        self.labels: list[np.ndarray] = []
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.zip = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self.entry = self.zip.open("arr_0.npy", "w", force_zip64=True)
        header = {"descr": npy_format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": self.shape}
        npy_format.write_array_header_1_0(self.entry, header)

    def add(self, images_u8_nchw: Tensor, labels: Tensor) -> None:
        nhwc = images_u8_nchw.permute(0, 2, 3, 1).contiguous().numpy()
        if nhwc.shape[1:] != self.shape[1:] or self.written + nhwc.shape[0] > self.shape[0]:
            raise ValueError(f"batch {nhwc.shape} does not fit the declared {self.shape}")
        self.entry.write(nhwc.tobytes())
        self.labels.append(labels.numpy().astype(np.int64))
        self.written += nhwc.shape[0]

    def close(self) -> Path:
        if self.written != self.shape[0]:
            self.abort()
            raise ValueError(f"wrote {self.written} of {self.shape[0]} images")
        self.entry.close()
        with self.zip.open("arr_1.npy", "w", force_zip64=True) as fh:
            npy_format.write_array(fh, np.concatenate(self.labels))
        self.zip.close()
        with open(self.tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self.entry.close()
            self.zip.close()
        finally:
            self.tmp.unlink(missing_ok=True)
