"""Initial values as a plan: a module's initialisation written tensor by tensor, in the order it
draws random numbers, as ``(name, init)`` pairs, ``init`` writing a tensor of the named one's
shape in place (``nn.init.xavier_uniform_``, ``zeros_``, ...).

:meth:`DiT.initialize_weights <diffmoe.models.DiT.initialize_weights>` applies the plan to the
model's own tensors. Because each step needs only the tensor's shape, the same plan can fill a
model whose tensors live elsewhere: built on the ``meta`` device and sharded, each rank runs a
step on one whole tensor at a time and keeps its shard (:func:`diffmoe.parallel.materialize`),
drawing the same random numbers in the same order, so the weights are those of a model built
whole on the CPU, bit for bit.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor

Init = Callable[[Tensor], object]
InitPlan = list[tuple[str, Init]]


def prefixed(prefix: str, plan: InitPlan) -> InitPlan:
    """A submodule's plan named from its parent (``prefix`` its name there)."""
    return [(f"{prefix}.{name}", init) for name, init in plan]


def tensor_of(module: nn.Module, name: str) -> Tensor:
    """The parameter or buffer ``name`` (dotted) of ``module``."""
    owner, _, attr = name.rpartition(".")
    found = getattr(module.get_submodule(owner), attr)
    if not isinstance(found, Tensor):
        raise AttributeError(f"{name} is not a tensor of {type(module).__name__}")
    return found


@torch.no_grad()
def apply_plan(module: nn.Module, plan: InitPlan) -> None:
    """Run ``plan`` on ``module``'s own tensors, in order."""
    for name, init in plan:
        init(tensor_of(module, name))
