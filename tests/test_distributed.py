"""In-process checks of diffmoe.distributed's teardown pieces (the multi-process behaviour is in
test_ddp.py): SIGTERM held during a teardown, the CLI's SIGTERM line, and the launcher watch."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from diffmoe import distributed
from diffmoe.cli import _stop_on_sigterm
from diffmoe.errors import DiffMoEError
from diffmoe.train import time_is_up


@pytest.fixture
def restore_sigterm():
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_during_a_teardown_is_held_and_reported_after(restore_sigterm):
    def outer(signum, frame):
        raise AssertionError("the teardown was interrupted")

    signal.signal(signal.SIGTERM, outer)
    with distributed._sigterm_deferred() as received:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs at the next bytecode boundary
        assert received == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is outer


def test_teardown_without_a_process_group_does_nothing():
    distributed.teardown(wait_for_others=True, step=3)  # no error, no wait


def test_cli_turns_sigterm_into_an_error_line(restore_sigterm):
    _stop_on_sigterm()
    with pytest.raises(DiffMoEError, match=r"^stopped by SIGTERM \(the job was cancelled"):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
    # Later SIGTERMs change nothing: the command is already ending.
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN


def test_launcher_watch_ends_the_rank_when_it_is_reparented(monkeypatch, restore_sigterm,
                                                            capsys):
    """The watch sees a parent other than the one it started with, says so, arms the hard
    deadline and sends SIGTERM to this process."""
    got, armed = threading.Event(), []
    signal.signal(signal.SIGTERM, lambda signum, frame: got.set())
    monkeypatch.setattr(distributed, "LAUNCHER_POLL_S", 0.01)
    monkeypatch.setattr(distributed, "_arm_deadline", armed.append)
    monkeypatch.setattr(distributed._session, "launcher_gone", False)
    watch = distributed._LauncherWatch(rank=3)
    watch.parent = -1  # as if the launcher that started this process had died
    watch.start()
    watch.join(timeout=5)
    deadline = time.monotonic() + 5
    while not got.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)  # the handler runs in the main thread
    assert got.is_set() and armed == [distributed.LAUNCHER_GONE_GRACE_S]
    assert "error: rank 3: its launcher (pid -1) is gone" in capsys.readouterr().err


def test_launcher_watch_stops_when_asked():
    watch = distributed._LauncherWatch(rank=0)
    watch.start()
    watch.stop()
    assert not watch.is_alive()


class _CollectiveCalled(Exception):
    def __init__(self, device):
        self.device = device


@pytest.fixture
def group_on_another_device(monkeypatch):
    """A pretend 2-rank process group whose collectives take tensors on the ``meta`` device (a
    stand-in for NCCL's CUDA device on a CPU-only machine). Its all_reduce raises
    :class:`_CollectiveCalled` with the device of the tensor it was handed."""
    def all_reduce(tensor, op=None):
        raise _CollectiveCalled(tensor.device)

    monkeypatch.setattr(distributed, "_in_group", lambda: True)
    monkeypatch.setattr(distributed, "group_device", lambda: torch.device("meta"))
    monkeypatch.setattr(distributed.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda group=None: 2)


@pytest.mark.parametrize("call", [
    lambda: distributed.all_mean(torch.ones(3)),
    lambda: distributed.any_rank(torch.tensor(True)),
    lambda: time_is_up(1e-9, 0.0),  # train.max_minutes' stop flag: a CPU tensor
], ids=["all_mean", "any_rank", "max_minutes"])
def test_collectives_get_tensors_on_the_group_device(group_on_another_device, call):
    with pytest.raises(_CollectiveCalled) as info:
        call()
    assert info.value.device == torch.device("meta")


def test_group_device_follows_the_backend(monkeypatch):
    monkeypatch.setattr(distributed.dist, "get_backend", lambda group=None: "gloo")
    assert distributed.group_device() == torch.device("cpu")
    monkeypatch.setattr(distributed.dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(distributed.torch.cuda, "current_device", lambda: 3)
    assert distributed.group_device() == torch.device("cuda", 3)
