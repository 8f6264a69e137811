"""Counting host synchronisations on a machine without a GPU.

On a GPU the host waits for the device whenever a value computed there is needed on the host
(``.item()``, ``bool()``/``int()``/``float()`` of a tensor, ``.tolist()``, ``.cpu()``,
``.numpy()``), when an op's output shape depends on the data (``nonzero``, boolean masks,
``masked_select``, ``unique``, ``repeat_interleave`` without ``output_size``), and at a blocking
copy between host and device (``.to(device)`` without ``non_blocking``, and Python data made a
device tensor, ``torch.tensor(data, device=...)``). On
the CPU none of these wait, so :class:`HostSyncCounter` records each *call* instead: aten ops
through a dispatch mode, the Python-level conversions by patching ``torch.Tensor`` for the
duration. Each event carries its kind, where in the package it happened, and the phase the test
was in (the model call, the capacity meter, the sampler around them, or ``setup`` before the first
model call). On CUDA, ``torch.cuda.set_sync_debug_mode`` is the real check (test_host_syncs.py).
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

PACKAGE = str(Path(__file__).resolve().parents[1] / "diffmoe")
aten = torch.ops.aten

# Ops whose result the host needs (a scalar) or whose output shape depends on the data.
SYNC_OPS = {aten._local_scalar_dense.default: "scalar to host", aten.nonzero.default: "nonzero",
            aten.masked_select.default: "masked_select", aten._unique2.default: "unique",
            aten.unique_dim.default: "unique", aten.unique_consecutive.default: "unique"}
# Ops that need the host when they index with a boolean mask.
INDEX_OPS = (aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
             aten._index_put_impl_.default)
# Tensor methods that hand device data to the host.
HOST_METHODS = ("tolist", "numpy", "cpu")


@dataclass
class SyncEvent:
    kind: str
    where: str  # file:line function, innermost frame in the package (or the caller's)
    phase: str
    call: int  # model calls finished before this event


def _where() -> str:
    frames = traceback.extract_stack()[:-3]
    inside = [f for f in frames if f.filename.startswith(PACKAGE)] or frames[-1:]
    f = inside[-1]
    return f"{Path(f.filename).name}:{f.lineno} {f.name}"


def _is_bool_index(index) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


class _Mode(TorchDispatchMode):
    def __init__(self, counter: "HostSyncCounter"):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNC_OPS:
            self.counter.record(SYNC_OPS[func])
        elif func == aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self.counter.record("repeat_interleave without output_size")
        elif func in INDEX_OPS and any(_is_bool_index(i) for i in (args[1] or ())):
            self.counter.record("boolean mask index")
        return func(*args, **kwargs)


@dataclass
class HostSyncCounter:
    """``with HostSyncCounter() as syncs: ...`` records every host synchronisation the code would
    make on a GPU (see the module docstring) in ``syncs.events``. :meth:`watch_model` and
    :meth:`watch_callback` attribute events to the model call and to a forward callback."""

    events: list[SyncEvent] = field(default_factory=list)
    # Count a .to(device) onto the tensor's own device too: on a CPU that is how a host-to-
    # device copy looks. False where only real moves matter (torch's clip_grad_norm_ moves each
    # clipping factor onto the device it is already on).
    same_device_copies: bool = True
    phase: str = "setup"
    calls: int = 0
    _undo: list[Callable[[], None]] = field(default_factory=list)

    def record(self, kind: str) -> None:
        self.events.append(SyncEvent(kind, _where(), self.phase, self.calls))

    def of(self, phase: str, call: Optional[int] = None) -> list[SyncEvent]:
        return [e for e in self.events if e.phase == phase and (call is None or e.call == call)]

    def watch_model(self, model: torch.nn.Module) -> None:
        """Events inside ``model``'s forward are in phase ``model``, then ``sampler``."""
        def enter(*_):
            self.phase = "model"

        def leave(*_):
            self.phase, self.calls = "sampler", self.calls + 1

        handles = [model.register_forward_pre_hook(enter), model.register_forward_hook(leave)]
        self._undo += [h.remove for h in handles]

    def watch_callback(self, fn: Callable) -> Callable:
        """``fn`` wrapped so that its events are in phase ``callback``."""
        def wrapped(*args, **kwargs):
            before, self.phase = self.phase, "callback"
            try:
                return fn(*args, **kwargs)
            finally:
                self.phase = before
        return wrapped

    def __enter__(self) -> "HostSyncCounter":
        for name in HOST_METHODS:
            self._patch(torch.Tensor, name, self._counted(getattr(torch.Tensor, name), name))
        self._patch(torch.Tensor, "to", self._counted_to(torch.Tensor.to))
        for name in ("tensor", "as_tensor"):
            self._patch(torch, name, self._counted_creation(getattr(torch, name), name))
        mode = _Mode(self)
        mode.__enter__()
        self._undo.append(lambda: mode.__exit__(None, None, None))
        return self

    def __exit__(self, *exc) -> None:
        while self._undo:
            self._undo.pop()()

    def _patch(self, owner, name: str, replacement) -> None:
        own = owner.__dict__.get(name)  # None: inherited (torch.Tensor's C methods)
        setattr(owner, name, replacement)
        self._undo.append(lambda: setattr(owner, name, own) if own is not None
                          else delattr(owner, name))

    def _counted(self, method, name: str):
        def counted(tensor, *args, **kwargs):
            self.record(name)
            return method(tensor, *args, **kwargs)
        return counted

    def _counted_to(self, method):
        def counted(tensor, *args, **kwargs):
            target = kwargs.get("device", args[0] if args else None)
            if (isinstance(target, (str, torch.device)) and not kwargs.get("non_blocking")
                    and (self.same_device_copies or torch.device(target) != tensor.device)):
                self.record("blocking copy .to(device)")
            return method(tensor, *args, **kwargs)
        return counted

    def _counted_creation(self, factory, name: str):
        def counted(data, *args, **kwargs):
            if kwargs.get("device") is not None and not isinstance(data, torch.Tensor):
                self.record(f"torch.{name} from Python data to a device")
            return factory(data, *args, **kwargs)
        return counted
