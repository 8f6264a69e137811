"""Checkpoints: safetensors weights + a JSON state, written atomically.

Layout of one checkpoint (a directory)::

    <run>/checkpoints/step_00001000/
        model.safetensors       training weights (and DiffMoE threshold buffers)
        ema.safetensors         EMA weights (and EMA thresholds, see train.ema_buffers)
        optimizer.safetensors   optimizer tensors (AdamW moments and step counts)
        rng.safetensors         every rank's RNG states
        state.json              step, resolved config, data position, optimizer hyper-parameters,
                                and the byte size and SHA-256 of every file above

A checkpoint is written into a hidden temporary directory, every file is fsynced, ``state.json``
last, and the directory is renamed into place; a crash at any moment leaves either the complete
new checkpoint or none. Old checkpoints are deleted the same way round: renamed out of the
``step_*`` namespace first, then removed, so a crash while pruning never leaves a half-deleted
directory that looks like a checkpoint. Leftovers of either (``.tmp-*``, ``.deleting-*``) are
removed on resume by :func:`remove_incomplete`. Removing a checkpoint removes only the files it
wrote (``state.json`` and the files its manifest lists): anything else found in its directory (a
sample grid written there, another run's directory) stays, in the directory under its old name,
which then no longer counts as a checkpoint.

``state.json`` lists each file's size and hash, so a truncated or damaged checkpoint is detected
and reported, never loaded silently: resume checks every hash before choosing a checkpoint, and
:meth:`LoadedCheckpoint.tensors` checks the hash of each file it loads.

Under torchrun a checkpoint is **sharded** (``"layout": "sharded"`` in ``state.json``): model,
EMA and optimizer state are ``torch.distributed.checkpoint`` (DCP) directories instead of
safetensors files, and every rank writes its own shards into them (``__<rank>_<n>.distcp``; rank
0 adds DCP's ``.metadata``)::

    <run>/checkpoints/step_00001000/
        model/  ema/  optimizer/   .metadata + __0_0.distcp, __1_0.distcp, ... (tensors by name)
        rng.safetensors            every rank's RNG states (small; rank 0 writes it)
        state.json                 as above; its manifest lists every file of the three directories

No rank gathers the model. Each rank hashes the files it wrote and sends rank 0 their sizes and
hashes; rank 0 writes ``state.json`` last and renames the directory into place, so the same
rules hold: complete or absent, checked on load, pruned by its own files. DCP stores each tensor
by name with its global shape, so a sharded checkpoint resumes at any world size and under any
engine (FSDP2, DDP, one process), and :meth:`LoadedCheckpoint.tensors` reads whole tensors from
it in one process without a process group (``diffmoe sample``, ``eval``, ``export-official``,
``save_pretrained``). A single process writes the safetensors layout.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from . import distributed
from .errors import CheckpointError
from .fileio import fsync_file, new_file_mode, sha256_file
from .paths import stamped, user_path

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
STATE_FILE = "state.json"
CHECKPOINTS_DIR = "checkpoints"  # where a run directory keeps its checkpoints
CKPT_RE = re.compile(r"^step_(\d{8})$")
OS_ERROR_RE = re.compile(r"\(os error (\d+)\)")  # how safetensors (Rust) names an errno
TMP_PREFIX = ".tmp-"  # a checkpoint being written
DELETING_PREFIX = ".deleting-"  # a checkpoint being pruned
DAMAGED_PREFIX = "damaged-"  # a damaged checkpoint moved aside; never deleted
KEYS_SHOWN = 3  # keys (or files) named in a message
SHARDED = "sharded"  # state.json "layout" of a checkpoint every rank wrote part of (DCP)
DCP_METADATA = ".metadata"  # the file DCP's rank 0 writes into each directory
DCP_SHARDS = "__*_*.distcp"  # the files DCP's ranks write (rank r: __r_<n>.distcp)
SHARDED_PARTS = ("model", "ema", "optimizer")  # the DCP directories of a sharded checkpoint
DCP_ONE_PROCESS = "torch.distributed is disabled"  # DCP's warning in one process


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def optimizer_to_tensors(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into safetensors-able tensors and JSON-able rest."""
    tensors, scalars = {}, {}
    for pid, st in state_dict["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for pid, st in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(ckpt_root: Path, step: int, files: dict[str, dict[str, torch.Tensor]],
                    state: dict[str, Any]) -> Path:
    """Write ``files`` (name → tensors, each saved as ``<name>.safetensors``) and ``state`` as one
    checkpoint for ``step``, atomically. An intact checkpoint of that step is never replaced; a
    damaged one (which resume skipped) is moved aside to ``damaged-step_XXXXXXXX-<time>``, kept
    for inspection, and replaced."""
    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / checkpoint_name(step)
    if _kept(final):
        return final
    return _put_in_place(_written_aside(ckpt_root, step, files, state), final)


def _kept(final: Path) -> bool:
    """Whether ``final`` is an intact checkpoint, which is never replaced. A damaged one is
    moved aside (see :func:`save_checkpoint`)."""
    if not final.exists() or (final.is_dir() and not holds_checkpoint_files(final)):
        return False
    try:
        verify_checkpoint(final)
        log.info("checkpoint %s already exists; not overwriting it", final)
        return True
    except CheckpointError as exc:
        aside = stamped(final.parent / f"{DAMAGED_PREFIX}{final.name}")
        os.rename(final, aside)
        log.warning("moved damaged checkpoint %s aside to %s (%s)", final, aside, exc)
        return False


def _put_in_place(tmp: Path, final: Path) -> Path:
    """The complete checkpoint ``tmp`` renamed to ``final``, or moved into it where ``final``
    is a directory of files the run did not write."""
    if final.is_dir():
        return _move_in_beside_others(tmp, final)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    return final


def save_sharded_checkpoint(ckpt_root: Path, step: int, parts: dict[str, dict[str, Any]],
                            files: dict[str, dict[str, torch.Tensor]],
                            state: dict[str, Any]) -> Optional[Path]:
    """Collective: the sharded checkpoint of ``step`` (see the module's docstring). Every rank
    writes its shards of each of ``parts`` (name → a state dict of tensors and DTensors, as
    ``torch.distributed.checkpoint.state_dict`` returns it) into ``<name>/``; rank 0 writes
    ``files`` (small full tensors) and ``state`` and puts the checkpoint in place. Returns its
    path on rank 0, None elsewhere."""
    rank, world = distributed.process_share()
    ckpt_root, tmp = Path(ckpt_root), None
    final = ckpt_root / checkpoint_name(step)
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if not _kept(final):
            tmp = ckpt_root / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
            if tmp.exists():
                _remove_own(tmp)
            tmp.mkdir()
    tmp = distributed.broadcast_object(tmp)
    if tmp is None:
        return final if rank == 0 else None
    for name, tensors in parts.items():
        with warnings.catch_warnings():  # DCP warns of every save without a process group
            warnings.filterwarnings("ignore", DCP_ONE_PROCESS, UserWarning)
            dcp.save({name: tensors}, storage_writer=FileSystemWriter(tmp / name, sync_files=True),
                     no_dist=world == 1)
    mine = {f"{name}/{p.name}": _file_record(p)
            for name in parts for p in sorted((tmp / name).glob(f"__{rank}_*.distcp"))}
    written = distributed.gather_to_main(mine)
    if rank != 0:
        distributed.barrier()
        return None
    manifest = {k: v for records in written for k, v in records.items()}
    for name in parts:
        manifest[f"{name}/{DCP_METADATA}"] = _file_record(tmp / name / DCP_METADATA)
        _fsync_dir(tmp / name)
    _write_checkpoint(tmp, step, files, dict(state, layout=SHARDED, parts=list(parts)),
                      manifest)
    path = _put_in_place(tmp, final)
    distributed.barrier()
    return path


def _file_record(path: Path) -> dict:
    """A file's entry in a checkpoint's manifest."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _written_aside(ckpt_root: Path, step: int, files: dict[str, dict[str, torch.Tensor]],
                   state: dict[str, Any]) -> Path:
    """The checkpoint written completely into a hidden temporary directory of ``ckpt_root``."""
    tmp = ckpt_root / f"{TMP_PREFIX}{checkpoint_name(step)}-{os.getpid()}"
    if tmp.exists():
        _remove_own(tmp)
    tmp.mkdir(exist_ok=True)
    try:
        _write_checkpoint(tmp, step, files, state)
    except BaseException:  # a full disk, a signal: the space goes back, the older ones stay
        _remove_own(tmp)
        raise
    return tmp


def _move_in_beside_others(tmp: Path, final: Path) -> Path:
    """The complete checkpoint ``tmp`` moved into ``final``, a directory of that name that holds
    only files the run did not write (kept where they are): each entry moved in,
    ``state.json`` last, so that it is a checkpoint only once complete."""
    names = sorted(p.name for p in tmp.iterdir())
    for name in sorted(names, key=lambda n: n == STATE_FILE):
        os.rename(tmp / name, final / name)
    tmp.rmdir()
    _fsync_dir(final)
    log.info("wrote checkpoint %s beside the files already there (%s)", final,
             ", ".join(p.name for p in sorted(final.iterdir()) if p.name not in names))
    return final


def _write_checkpoint(tmp: Path, step: int, files: dict[str, dict[str, torch.Tensor]],
                      state: dict[str, Any], manifest: Optional[dict] = None) -> None:
    """Every file of one checkpoint into the directory ``tmp``, each fsynced, state.json last,
    its manifest listing them (and ``manifest``: files already written there)."""
    manifest = dict(manifest or {})
    for name, tensors in files.items():
        path = tmp / f"{name}.safetensors"
        try:
            save_file(_contiguous(tensors), str(path))
        except SafetensorError as exc:
            raise _as_os_error(exc, path) from exc
        os.chmod(path, new_file_mode())  # save_file makes it 0600; the rest of the run is not
        fsync_file(path)
        manifest[path.name] = _file_record(path)
    full_state = dict(state, format_version=FORMAT_VERSION, step=step, files=manifest)
    with open(tmp / STATE_FILE, "w") as fh:
        json.dump(full_state, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(tmp)


def _as_os_error(exc: SafetensorError, path: Path) -> Exception:
    """safetensors' writer reports a failed write (a full disk, say) as its own error with the
    OS's ``(os error N)`` in the message: the OSError it stands for, else ``exc``."""
    found = OS_ERROR_RE.search(str(exc))
    if found is None:
        return exc
    code = int(found.group(1))
    return OSError(code, os.strerror(code), str(path))


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Checkpoint directories under ``ckpt_root``, oldest first (temporary ones excluded)."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir()
             if p.is_dir() and CKPT_RE.match(p.name) and holds_checkpoint_files(p)]
    return sorted(found, key=lambda p: int(CKPT_RE.match(p.name).group(1)))


def verify_checkpoint(path: Path, check_hashes: bool = True) -> dict:
    """Return the checkpoint's state if every file is present and intact, else raise
    :class:`CheckpointError` naming what is wrong."""
    path = Path(path)
    state_path = path / STATE_FILE
    if not path.is_dir():
        raise CheckpointError(f"checkpoint '{path}' does not exist; pass a run directory or one of "
                              f"its checkpoints/step_XXXXXXXX directories")
    if not state_path.is_file():
        raise CheckpointError(f"'{path}' is not a diffmoe checkpoint (no {STATE_FILE}); pass a run "
                              f"directory or a checkpoints/step_XXXXXXXX directory")
    try:
        state = json.loads(state_path.read_text())
        manifest = {str(name): {"bytes": int(info["bytes"]), "sha256": str(info["sha256"])}
                    for name, info in state["files"].items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError,
            UnicodeDecodeError):
        raise CheckpointError(f"checkpoint '{path}' is corrupt ({STATE_FILE} is unreadable); "
                              f"use an earlier checkpoint of the run") from None
    for name, info in manifest.items():
        _check_file(path, name, info, check_hashes)
    return state


def _check_file(path: Path, name: str, info: dict, check_hash: bool) -> None:
    fpath = path / name
    if not fpath.is_file():
        raise CheckpointError(f"checkpoint '{path}' is incomplete ({name} is missing); use an "
                              f"earlier checkpoint of the run")
    size = fpath.stat().st_size
    if size != info["bytes"]:
        raise CheckpointError(f"checkpoint '{path}' is corrupt ({name} has {size} bytes, "
                              f"expected {info['bytes']}); use an earlier checkpoint of the run")
    if check_hash and sha256_file(fpath) != info["sha256"]:
        raise CheckpointError(f"checkpoint '{path}' is corrupt ({name} fails its SHA-256 "
                              f"check); use an earlier checkpoint of the run")


def find_latest_checkpoint(ckpt_root: Path, check_hashes: bool = True) -> Optional[Path]:
    """The newest intact checkpoint; damaged newer ones are reported and skipped."""
    for path in reversed(list_checkpoints(ckpt_root)):
        try:
            verify_checkpoint(path, check_hashes)
            return path
        except CheckpointError as exc:
            log.warning("skipping damaged checkpoint: %s", exc)
    return None


def resolve_checkpoint(path: str | Path, check_hashes: bool = False) -> Path:
    """Accept a checkpoint directory or a run directory (→ its newest intact checkpoint)."""
    path = Path(user_path(str(path)))
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist; pass a run directory or one of "
                              f"its checkpoints/step_XXXXXXXX directories")
    if (path / STATE_FILE).is_file():
        return path
    if (path / CHECKPOINTS_DIR).is_dir():
        latest = find_latest_checkpoint(path / CHECKPOINTS_DIR, check_hashes)
        if latest is None:
            raise CheckpointError(f"run '{path}' has no intact checkpoint; train longer or point "
                                  f"at another run")
        return latest
    raise CheckpointError(f"'{path}' is neither a checkpoint nor a run directory; pass e.g. "
                          f"runs/mnist_diffmoe or runs/mnist_diffmoe/checkpoints/step_00001000")


def parts_held(state: dict) -> set[str]:
    """The parts (``model``, ``ema``, ...) a checkpoint's ``state.json`` lists: safetensors
    files, or the DCP directories of a sharded one."""
    files = {name.removesuffix(".safetensors") for name in state.get("files", {})
             if name.endswith(".safetensors")}
    return files | set(state.get("parts", ()) if state.get("layout") == SHARDED else ())


@dataclass
class LoadedCheckpoint:
    path: Path
    state: dict
    # True when every file's hash was already checked (resume does so to choose a checkpoint).
    verified: bool = False

    @property
    def sharded(self) -> bool:
        """Whether every rank wrote part of it (DCP directories, see the module's docstring)."""
        return self.state.get("layout") == SHARDED

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The whole tensors of ``name`` (``model``, ``ema``, ``optimizer``, ``rng``), after
        checking its files against the sizes and SHA-256s that ``state.json`` recorded. From a
        sharded checkpoint every shard is read in this process, without a process group (the
        optimizer's tensors then keyed ``state.<parameter name>.<key>``)."""
        if self.sharded and name in self.state.get("parts", ()):
            return self._whole_tensors(name)
        fpath = self.path / f"{name}.safetensors"
        self._check(fpath.name)
        try:
            return load_file(str(fpath))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"checkpoint '{self.path}' is corrupt ({fpath.name}: {exc}); use "
                                  f"an earlier checkpoint of the run") from None

    def _check(self, *names: str) -> None:
        files = self.state.get("files", {})
        for name in names:
            if name not in files:
                raise CheckpointError(f"checkpoint '{self.path}' has no {name} in its "
                                      f"{STATE_FILE}; use an earlier checkpoint of the run")
            if not self.verified:
                _check_file(self.path, name, files[name], check_hash=True)

    def _check_part(self, name: str) -> None:
        """Check the files of the DCP directory ``name`` (all that the manifest lists there)."""
        self._check(f"{name}/{DCP_METADATA}",
                    *[f for f in self.state.get("files", {}) if f.startswith(f"{name}/")])

    def shapes(self, name: str) -> dict[str, torch.Tensor]:
        """Tensors of the meta device with the shapes and dtypes the sharded part ``name``
        holds, keyed as :meth:`tensors` keys them (what a load is checked against)."""
        self._check(f"{name}/{DCP_METADATA}")
        try:
            metadata = FileSystemReader(str(self.path / name)).read_metadata()
        except Exception as exc:  # DCP unpickles its metadata: any error is a damaged file
            raise CheckpointError(f"checkpoint '{self.path}' is corrupt ({name}/{DCP_METADATA}: "
                                  f"{exc}); use an earlier checkpoint of the run") from None
        prefix = f"{name}."
        return {key.removeprefix(prefix): torch.empty(md.size, dtype=md.properties.dtype,
                                                      device="meta")
                for key, md in metadata.state_dict_metadata.items()
                if isinstance(md, TensorStorageMetadata) and key.startswith(prefix)}

    def read_into(self, name: str, tensors: dict[str, Any], partial: bool = False,
                  whole: bool = False) -> None:
        """Fill ``tensors`` (a state dict of tensors and DTensors, keyed as the part was saved)
        in place from the sharded part ``name``: each rank reads the pieces its shards need, in
        a collective under torchrun (``whole``: this process alone, whatever the process group).
        ``partial``: keys the checkpoint lacks are left as they are."""
        self._check_part(name)
        reader = FileSystemReader(str(self.path / name))
        try:
            with warnings.catch_warnings():  # DCP warns of every load without a process group
                warnings.filterwarnings("ignore", DCP_ONE_PROCESS, UserWarning)
                dcp.load({name: tensors}, storage_reader=reader,
                         planner=DefaultLoadPlanner(allow_partial_load=partial),
                         no_dist=whole or distributed.process_share()[1] == 1)
        except Exception as exc:  # DCP wraps every rank's failure in its own error type
            raise CheckpointError(f"checkpoint '{self.path}' could not be read ({name}: "
                                  f"{str(exc).strip().splitlines()[-1]}); use an earlier "
                                  f"checkpoint of the run") from None

    def _whole_tensors(self, name: str) -> dict[str, torch.Tensor]:
        tensors = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in self.shapes(name).items()}
        self.read_into(name, tensors, whole=True)
        return tensors


def open_checkpoint(path: str | Path, check_hashes: bool = False) -> LoadedCheckpoint:
    """Open a checkpoint or a run's newest complete one. ``check_hashes`` checks every file now;
    otherwise each file's hash is checked when :meth:`LoadedCheckpoint.tensors` loads it."""
    ckpt = resolve_checkpoint(path, check_hashes)
    return LoadedCheckpoint(ckpt, verify_checkpoint(ckpt, check_hashes), verified=check_hashes)


# -- removing: only what a checkpoint wrote -----------------------------------------------------

def own_files(path: Path) -> list[Path]:
    """The files of the checkpoint directory ``path`` that the checkpoint wrote: state.json and
    the files its manifest lists; with no readable state.json (a write cut short), the
    ``*.safetensors`` files and the DCP files of its directories, which is all a checkpoint
    writes before it."""
    try:
        names = set(json.loads((path / STATE_FILE).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        names = {str(p.relative_to(path)) for p in _written_files(path)}
    return [path / name for name in sorted(names | {STATE_FILE})
            if (path / name).is_file() and not (path / name).is_symlink()]


def _written_files(path: Path) -> list[Path]:
    """What a checkpoint writes before its state.json: safetensors files, and DCP's files in
    its directories."""
    return [*path.glob("*.safetensors"), *path.glob(f"*/{DCP_SHARDS}"),
            *path.glob(f"*/{DCP_METADATA}")]


def holds_checkpoint_files(path: Path) -> bool:
    """Whether the directory holds a checkpoint (complete or not), not only others' files."""
    return (path / STATE_FILE).exists() or bool(_written_files(path))


def _foreign(path: Path) -> list[str]:
    """The names in the checkpoint directory ``path`` that hold something it did not write."""
    own = set(own_files(path))
    return sorted(p.name for p in path.iterdir() if p not in own and not (
        p.is_dir() and not p.is_symlink() and any(p.iterdir())
        and all(q in own for q in p.iterdir())))


def _remove_own(path: Path) -> list[str]:
    """Remove the files the checkpoint in ``path`` wrote (state.json first, so that what is
    left is never taken for an intact checkpoint), then the directories that left empty.
    Returns the names of what else it holds (kept)."""
    for file in sorted(own_files(path), key=lambda p: p.name != STATE_FILE):
        file.unlink()
    for name in SHARDED_PARTS:  # a part's directory, emptied or made by a write cut short
        folder = path / name
        if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
            folder.rmdir()
    others = sorted(p.name for p in path.iterdir())
    if not others:
        path.rmdir()
    return others


def _remove_checkpoint(path: Path, original: Path) -> None:
    """Remove the checkpoint's own files from ``path`` (``original`` renamed away for the
    removal); a directory that still holds others' files goes back to its name, with a
    warning naming them."""
    others = _remove_own(path)
    if not others:
        log.info("removed old checkpoint %s", original)
        return
    if path != original and not os.path.lexists(original):
        os.rename(path, original)
        path = original
    shown = ", ".join(others[:KEYS_SHOWN]) + (" ..." if len(others) > KEYS_SHOWN else "")
    log.warning("removed old checkpoint %s but kept its directory %s, which holds files the run "
                "did not write (%s)", original, path, shown)


def prune_checkpoints(ckpt_root: Path, keep: int) -> None:
    """Remove all but the newest ``keep`` checkpoints (each renamed away first, then its own
    files removed)."""
    for old in list_checkpoints(ckpt_root)[:-keep]:
        if _foreign(old):
            # Others' files (a sample grid, a run training there): the directory stays put.
            _remove_checkpoint(old, old)
            continue
        doomed = old.with_name(DELETING_PREFIX + old.name)
        os.rename(old, doomed)
        _remove_checkpoint(doomed, old)


def remove_incomplete(ckpt_root: Path) -> list[Path]:
    """Remove what an interrupted save or prune left behind (``.tmp-*``, ``.deleting-*``: the
    files a checkpoint writes) and return those directories. Only for a run no other process
    is writing to."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return []
    removed = sorted(p for p in ckpt_root.iterdir()
                     if p.is_dir() and p.name.startswith((TMP_PREFIX, DELETING_PREFIX))
                     and (p.name.startswith(DELETING_PREFIX) or holds_checkpoint_files(p)
                          or not any(p.iterdir())))
    for path in removed:
        deleting = path.name.startswith(DELETING_PREFIX)
        log.warning("removing %s, left by an interrupted checkpoint %s", path,
                    "deletion" if deleting else "write")
        original = path.with_name(path.name.removeprefix(DELETING_PREFIX)) if deleting else path
        _remove_checkpoint(path, original)
    return removed


def state_dict_mismatch(given: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                        expected_in: str, optional: frozenset[str] = frozenset()) -> list[str]:
    """What keeps ``given`` from loading where ``expected`` (described by ``expected_in``, e.g.
    "in the model") is: missing keys (but ``optional``), unexpected keys, a few of each named,
    and the first wrong shape. Empty when it fits."""
    missing = sorted(set(expected) - set(given) - optional)
    unexpected = sorted(set(given) - set(expected))
    wrong = [k for k in expected
             if k in given and tuple(given[k].shape) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing, e.g. {missing[:KEYS_SHOWN]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[:KEYS_SHOWN]}")
    if wrong:
        k = wrong[0]
        parts.append(f"shape of {k} is {tuple(given[k].shape)} in the checkpoint, "
                     f"{tuple(expected[k].shape)} {expected_in}")
    return parts


def load_state_dict_checked(module: torch.nn.Module, tensors: dict[str, torch.Tensor],
                            where: str, load: Optional[Callable[[dict], Any]] = None) -> None:
    """Load weights, turning key or shape mismatches into one clear line. ``load`` replaces
    ``module.load_state_dict`` (a sharded module loads full tensors another way)."""
    parts = state_dict_mismatch(tensors, module.state_dict(), "in the model")
    if parts:
        raise CheckpointError(f"checkpoint {where} does not match the model architecture ("
                              f"{'; '.join(parts)}); use the config the checkpoint was trained "
                              f"with")
    (load or module.load_state_dict)(tensors)
