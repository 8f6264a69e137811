"""Reading back what an offline W&B run wrote: the records of its ``run-<id>.wandb`` file.

wandb 0.31 ships no reader for these files, so this follows their format: a 7-byte header
(``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each with a 7-byte header
(checksum, length, type: 1 full, 2 first, 3 middle, 4 last), a block's last bytes padding when
fewer than 7 are left; a record is one protobuf ``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

HEADER = struct.Struct("<4sHB")
CHUNK = struct.Struct("<IHB")
IDENT, MAGIC, VERSION = b":W&B", 0xBEE1, 0
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert HEADER.unpack_from(data) == (IDENT, MAGIC, VERSION), f"{path} is no W&B run file"
    records, parts, pos = [], [], HEADER.size
    while pos + CHUNK.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK.size:
            pos += left
            continue
        _, length, kind = CHUNK.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += left
            continue
        assert kind in (FULL, FIRST, MIDDLE, LAST), f"{path}: chunk type {kind} at {pos}"
        parts.append(data[pos + CHUNK.size:pos + CHUNK.size + length])
        pos += CHUNK.size + length
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
            parts = []
    return records


def history(records: list) -> dict[int, dict]:
    """step -> {key: value} of the history rows (nested keys joined with '.', W&B's own
    ``_runtime``, ``_timestamp`` and ``_step`` left out)."""
    rows: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") != "history":
            continue
        row = rows.setdefault(r.history.step.num, {})
        for item in r.history.item:
            key = ".".join(item.nested_key) or item.key
            if not key.startswith("_"):
                row[key] = json.loads(item.value_json)
    return rows


def run_config(records: list) -> dict:
    """The run's config as W&B holds it: {key: value} of its run record."""
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    return {item.key: json.loads(item.value_json) for item in run.config.update}
