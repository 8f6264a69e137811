"""Sharded checkpoints under torchrun (2 and 3 gloo ranks on the CPU): every rank writes its own
shards, a rank killed in the middle of a save leaves the previous checkpoint usable, and a run
resumes at another world size and under another engine holding exactly the checkpoint's tensors.
Commands that read weights (sample, export-official, save_pretrained) read a sharded checkpoint
in one process, without a process group."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import jobs
import pytest
import torch
from jobs import job_env
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

from diffmoe.checkpoint import (
    SHARDED,
    TMP_PREFIX,
    checkpoint_name,
    list_checkpoints,
    open_checkpoint,
    prune_checkpoints,
    remove_incomplete,
    save_sharded_checkpoint,
)
from diffmoe.cli import main as cli
from diffmoe.config import load_config
from diffmoe.hub import load_pretrained, save_pretrained

HERE = Path(__file__).parent
CONFIG = HERE.parent / "configs" / "digits_tiny.yaml"
TIMEOUT_S = 300
STEPS = 4
# A global batch that 1, 2 and 3 ranks split evenly.
RUN = {"train.steps": STEPS, "train.ckpt_every": 2, "train.log_every": 2,
       "train.sample_every": STEPS, "train.batch_size": 12, "train.parallel": "fsdp",
       "sample.steps": 1, "sample.num": 4, "sample.batch_size": 4}
PARTS = ("model", "ema", "optimizer")
# The largest share of a part's bytes one of two ranks' files may hold: FSDP2 splits every
# parameter in two, and the few replicated tensors (thresholds, step counts) go to one file.
SHARE_OF_ONE_RANK = 0.75



def settings(run: Path, **extra) -> list[str]:
    return [f"{k}={v}" for k, v in {**RUN, "train.out_dir": run, **extra}.items()]


def train(run: Path, faults: str = "", **config) -> jobs.Job:
    """``diffmoe train`` of ``run`` on 2 ranks, with ``faults`` (tests/fault_runner.py)."""
    args = [str(HERE / "fault_runner.py"), "train", str(CONFIG), *settings(run, **config)]
    return jobs.torchrun(args, TIMEOUT_S, job_env(DIFFMOE_FAULTS=faults))


def check_loaded(run: Path, nproc: int, report: Path, **config) -> dict:
    """tests/scale_check.py ``loaded``: resume ``run`` on ``nproc`` ranks, compare what every
    rank holds with the checkpoint, then train on to ``train.steps``."""
    proc = jobs.torchrun([str(HERE / "scale_check.py"), "loaded", str(CONFIG), str(report),
                          *settings(run, **config)], TIMEOUT_S, nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(report.read_text())


def tensor_bytes_per_file(directory: Path) -> dict[str, int]:
    """The bytes of tensor data each file of a DCP directory holds, from its metadata (file
    sizes would count DCP's serialisation overhead, which dominates at this size)."""
    metadata = FileSystemReader(str(directory)).read_metadata()
    held: dict[str, int] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            continue
        for chunk in md.chunks:
            where = metadata.storage_data[MetadataIndex(fqn, chunk.offsets)].relative_path
            nbytes = math.prod(chunk.sizes) * torch.empty((), dtype=md.properties.dtype
                                                          ).element_size()
            held[where] = held.get(where, 0) + nbytes
    return held


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> Path:
    """A 2-rank FSDP2 run whose rank 1 was SIGKILLed while writing its shards of step 4's
    checkpoint (after the model's, before the EMA's); step 2's is the last one."""
    run = tmp_path_factory.mktemp("sharded") / "run"
    proc = train(run, faults="save-mid-shards:2:1")
    assert proc.returncode != 0 and "SIGKILL" in proc.stderr, proc.stderr[-3000:]
    return run


@pytest.mark.slow
def test_a_rank_killed_mid_save_leaves_the_previous_sharded_checkpoint(killed):
    root = killed / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == [checkpoint_name(2)]
    partial = [p for p in root.iterdir() if p.name.startswith(TMP_PREFIX)]
    assert len(partial) == 1 and (partial[0] / "model" / "__0_0.distcp").is_file()
    ckpt = open_checkpoint(killed, check_hashes=True)
    assert ckpt.sharded and ckpt.state["layout"] == SHARDED and ckpt.state["world_size"] == 2
    for part in PARTS:
        files = sorted(p.name for p in (ckpt.path / part).iterdir())
        assert files == [".metadata", "__0_0.distcp", "__1_0.distcp"], (part, files)
        # No file holds the whole model: each rank wrote about half of every part's bytes.
        held = tensor_bytes_per_file(ckpt.path / part)
        whole = sum(t.numel() * t.element_size() for t in ckpt.shapes(part).values())
        assert sorted(held) == files[1:] and sum(held.values()) == whole, (part, held, whole)
        assert all(b < SHARE_OF_ONE_RANK * whole for b in held.values()), (part, held, whole)


@pytest.mark.slow
def test_one_process_resumes_the_sharded_checkpoint_as_an_uninterrupted_run_would(
        killed, tmp_path):
    from diffmoe.train import Trainer

    # The kill left step 2's checkpoint and a partial one; one process resumes from step 2.
    run = tmp_path / "killed"
    shutil.copytree(killed, run)
    cfg = load_config(CONFIG, settings(run))
    trainer = Trainer(cfg, resume=True)
    try:
        assert trainer.step == 2
        ckpt = open_checkpoint(trainer.run.opening.checkpoint)
        # Resharding moves bytes and does no arithmetic: the state is the checkpoint's, bitwise.
        for name, module in (("model", trainer.model.module), ("ema", trainer.ema)):
            saved, held = ckpt.tensors(name), module.state_dict()
            assert saved.keys() == held.keys()
            assert all(torch.equal(saved[k], held[k]) for k in saved), name
        saved = ckpt.tensors("optimizer")
        names = [n for n, _ in trainer.model.module.named_parameters()]
        held = {f"state.{names[i]}.{k}": v
                for i, st in trainer.optimizer.state_dict()["state"].items()
                for k, v in st.items()}
        assert saved.keys() == held.keys() and len(saved) > 0
        assert all(torch.equal(saved[k], held[k].reshape(saved[k].shape)) for k in saved)
        trainer.train()
    finally:
        trainer.close()
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(TMP_PREFIX)]

    # The uninterrupted run: 2 ranks to step 2 without a kill, then the same 1-process resume.
    reference = tmp_path / "uninterrupted"
    proc = train(reference, **{"train.steps": 2})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = Trainer(load_config(CONFIG, settings(reference)), resume=True, accept_changes=True)
    try:
        ref.train()
    finally:
        ref.close()
    a, b = (open_checkpoint(r / "checkpoints" / checkpoint_name(STEPS)) for r in (run, reference))
    assert not a.sharded and a.state["world_size"] == 1
    for name in PARTS:
        ta, tb = a.tensors(name), b.tensors(name)
        # The same computation from the same bytes on this machine: bitwise.
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name


@pytest.mark.slow
@pytest.mark.parametrize("parallel, nproc", [("fsdp", 3), ("ddp", 2)],
                         ids=["fsdp2-on-3-ranks", "ddp-on-2-ranks"])
def test_other_world_sizes_and_engines_resume_holding_the_checkpoint(killed, tmp_path,
                                                                       parallel, nproc):
    run = tmp_path / "run"
    shutil.copytree(killed, run)
    report = check_loaded(run, nproc, tmp_path / "loaded.json", **{"train.parallel": parallel})
    assert report["step"] == 2 and report["fsdp"] == (parallel == "fsdp")
    assert report["model"] and report["ema"] and report["optimizer"], report
    assert report["optimizer_entries"] > 0
    if parallel == "fsdp":  # each of 3 ranks holds a third of the rows (FSDP2 pads the last)
        d = load_config(CONFIG).model.hidden_size
        assert report["local_shapes"]["blocks.0.attn.qkv.weight"][0] == d
    assert report["final_step"] == STEPS
    last = open_checkpoint(run)
    assert last.state["step"] == STEPS and last.state["world_size"] == nproc and last.sharded
    shards = sorted(p.name for p in (last.path / "model").glob("__*.distcp"))
    assert len(shards) == nproc, shards


@pytest.mark.slow
def test_a_single_process_checkpoint_resumes_under_fsdp2(tmp_path):
    """Checkpoints of one file (a single process's, and every one written before sharding) load
    into a sharded model, each rank taking its shards of the whole tensors."""
    from diffmoe.train import Trainer

    run = tmp_path / "run"
    trainer = Trainer(load_config(CONFIG, settings(run, **{"train.steps": 2})))
    try:
        trainer.train()
    finally:
        trainer.close()
    assert not open_checkpoint(run).sharded
    report = check_loaded(run, 2, tmp_path / "loaded.json", **{"train.steps": 2})
    assert report["fsdp"] and report["model"] and report["ema"] and report["optimizer"], report


@pytest.mark.slow
def test_weights_are_read_from_a_sharded_checkpoint_without_a_process_group(killed, tmp_path):
    assert not torch.distributed.is_initialized()
    ema = open_checkpoint(killed).tensors("ema")
    pretrained = load_pretrained(killed)
    held = pretrained.model.state_dict()
    assert all(torch.equal(ema[k], held[k]) for k in held)
    save_pretrained(pretrained, tmp_path / "folder")
    assert torch.equal(load_pretrained(tmp_path / "folder").model.state_dict()[
        "blocks.1.mlp.thresholds_E"], ema["blocks.1.mlp.thresholds_E"])
    assert cli(["sample", str(killed), "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").is_file()
    assert cli(["export-official", str(killed), str(tmp_path / "official")]) == 0
    exported = torch.load(next((tmp_path / "official" / "checkpoints").glob("*.pt")),
                          weights_only=True)
    assert set(exported) >= {"model", "ema"}


def write_sharded(root: Path, step: int) -> Path:
    """A sharded checkpoint written by this process alone (a world of one)."""
    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    return save_sharded_checkpoint(root, step, {"model": tensors, "ema": tensors,
                                                "optimizer": {"state": {}}}, {}, {})


def test_sharded_checkpoints_are_pruned_by_their_own_files_only(tmp_path):
    root = tmp_path / "checkpoints"
    first = write_sharded(root, 1)
    (first / "model" / "notes.txt").write_text("mine")  # a file the checkpoint did not write
    for step in (2, 3):
        write_sharded(root, step)
    prune_checkpoints(root, keep=1)
    assert [p.name for p in list_checkpoints(root)] == [checkpoint_name(3)]
    assert not (root / checkpoint_name(2)).exists()
    # The other one's own files went; the note, and the folders holding it, stayed.
    assert sorted(p.relative_to(first).as_posix() for p in first.rglob("*")) == [
        "model", "model/notes.txt"]
    assert torch.equal(open_checkpoint(root / checkpoint_name(3)).tensors("ema")["w"],
                       torch.arange(6.0).reshape(2, 3))


def test_a_partial_sharded_write_is_removed_on_resume(tmp_path):
    root = tmp_path / "checkpoints"
    done = write_sharded(root, 1)
    partial = root / f"{TMP_PREFIX}{checkpoint_name(2)}-123"
    shutil.copytree(done / "model", partial / "model")  # the shards of a write cut short
    (partial / "ema").mkdir()
    assert remove_incomplete(root) == [partial] and not partial.exists()
    assert [p.name for p in list_checkpoints(root)] == [checkpoint_name(1)]
