"""The host-synchronisation budget of sampling (docs/performance.md, "Host synchronisations"):
per model call, one per DiffMoE layer in dynamic and threshold mode (its counts read to the host)
and none in static mode; none in the capacity meter; none in a sampler's own step; and what
comes before the first model call (host-side tables) does not grow with the number of steps.
Counted on the CPU by host_syncs.HostSyncCounter; on CUDA by torch's sync debug mode."""

from __future__ import annotations

import warnings

import pytest
import torch
from host_syncs import HostSyncCounter

from diffmoe.capacity import CapacityMeter
from diffmoe.config import load_config
from diffmoe.diffusion import build_objective
from diffmoe.diffusion.samplers import sample
from diffmoe.models import build_model
from diffmoe.models.moe import Routing, diffmoe_layers

DEPTH = 4  # two MoE blocks (interleave)
TINY = ["model.input_size=8", "model.in_channels=4", "model.patch_size=2", f"model.depth={DEPTH}",
        "model.hidden_size=32", "model.num_heads=2", "model.num_classes=4",
        "model.moe.num_experts=4"]
LABELS = [0, 1, 2, 3]


def tiny(kind: str = "diffmoe", objective: str = "flow"):
    cfg = load_config(None, TINY + [f"model.moe.type={kind}", f"objective.type={objective}",
                                    f"model.learn_sigma={str(objective == 'ddpm').lower()}"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    for p in model.parameters():  # leave adaLN-Zero so the layers see varied inputs
        torch.nn.init.normal_(p, std=0.05)
    for layer in diffmoe_layers(model):
        layer.thresholds_E.fill_(0.5)
    return model, build_objective(cfg)


def per_call(counter: HostSyncCounter, phase: str = "model") -> list[int]:
    return [len(counter.of(phase, call)) for call in range(counter.calls)]


def test_counter_records_each_kind_of_sync_once_and_nothing_else():
    x, i = torch.randn(6), torch.tensor([1, 2])
    syncing = [lambda: x[0].item(), lambda: bool(x[0] > 0), lambda: int(i[0]),
               lambda: float(x[0]), lambda: x.tolist(), lambda: x.cpu(), lambda: x.numpy(),
               lambda: x.to("cpu"), lambda: x.nonzero(), lambda: x[x > 0],
               lambda: x.masked_select(x > 0), lambda: i.unique(),
               lambda: torch.repeat_interleave(torch.arange(2), i),
               lambda: torch.tensor([1.0], device="cpu")]
    free = [lambda: x.topk(2), lambda: x.index_select(0, i), lambda: x[i], lambda: x.max(),
            lambda: torch.repeat_interleave(torch.arange(2), i, output_size=3),
            lambda: torch.nonzero_static(x > 0, size=2), lambda: x.to(torch.float64),
            lambda: torch.full((2,), 1.0, device="cpu"), lambda: x.to("cpu", non_blocking=True)]
    for fn in syncing + free:
        with HostSyncCounter() as counter:
            fn()
        assert len(counter.events) == (fn in syncing), counter.events
    assert "tolist" not in torch.Tensor.__dict__  # the patches are undone


@pytest.mark.parametrize("mode", ["dynamic", "threshold", "static"])
def test_diffmoe_model_call_reads_the_host_once_per_layer_in_dynamic_mode_only(mode):
    model, _ = tiny()
    x, t = torch.randn(4, 4, 8, 8), torch.rand(4) * 1000
    with torch.no_grad(), HostSyncCounter() as counter:
        counter.watch_model(model)
        for _ in range(2):
            model(x, t, torch.tensor(LABELS), Routing(mode, 0.5))
    layers = len(model.moe_layers())
    assert per_call(counter) == [0 if mode == "static" else layers] * 2
    assert {(e.kind, e.where.split(":")[0]) for e in counter.events} <= {("tolist", "diffmoe.py")}


@pytest.mark.parametrize("kind,per_layer", [("expert_choice", 0), ("dense", 0),
                                            ("token_choice", 1)])
def test_other_ffn_types_per_model_call(kind, per_layer):
    """Expert choice has fixed capacities; token choice's counts depend on the data, so on a
    device without a fast grouped GEMM its kernel reads the largest count (docs)."""
    model, _ = tiny(kind)
    with torch.no_grad(), HostSyncCounter() as counter:
        counter.watch_model(model)
        model(torch.randn(4, 4, 8, 8), torch.rand(4) * 1000, torch.tensor(LABELS))
    assert per_call(counter) == [per_layer * len(model.moe_layers())]


def sample_counted(model, objective, sampler: str, mode: str, steps: int
                   ) -> tuple[HostSyncCounter, CapacityMeter]:
    meter = CapacityMeter(track_experts=True)
    with HostSyncCounter() as counter:
        counter.watch_model(model)
        sample(model, objective, torch.tensor(LABELS), sampler=sampler, steps=steps,
               cfg_scale=1.5, routing=Routing(mode), on_forward=counter.watch_callback(
                   meter.on_forward), generator=torch.Generator().manual_seed(0))
    return counter, meter


@pytest.mark.parametrize("sampler,objective", [("euler", "flow"), ("heun", "flow"),
                                               ("sde", "flow"), ("ddpm", "ddpm"),
                                               ("ddim", "ddpm")])
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_sampling_budget(sampler, objective, mode):
    model, process = tiny(objective=objective)
    layers = len(model.moe_layers())
    setups = []
    for steps in (2, 3):
        counter, meter = sample_counted(model, process, sampler, mode, steps)
        assert counter.calls == steps * (2 if sampler == "heun" else 1)
        assert per_call(counter) == [layers if mode == "dynamic" else 0] * counter.calls
        assert counter.of("callback") == [] and counter.of("sampler") == []
        setups.append([(e.kind, e.where) for e in counter.of("setup")])
        assert meter.num_forwards == counter.calls and 0 < meter.c_avg()
    assert setups[0] == setups[1]  # host-side tables, read once per batch at most


def test_the_meter_copies_its_records_to_the_host_once_when_read():
    model, process = tiny()
    _, meter = sample_counted(model, process, "euler", "dynamic", 3)
    with HostSyncCounter() as counter:
        per_layer, per_expert = meter.per_layer, meter.per_expert
    assert [e.kind for e in counter.events] == ["cpu"]  # one copy for every waiting record
    assert len(per_layer) == 3 and all(p.device.type == "cpu" for p in per_layer)
    assert len(per_expert[0]) == len(model.moe_layers())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_sampling_budget_on_cuda(mode):
    """The real check: torch's sync debug mode warns at every synchronising CUDA call."""
    model, process = tiny()
    model.cuda()
    labels = torch.tensor(LABELS, device="cuda")
    meter = CapacityMeter()
    sample(model, process, labels, steps=1, routing=Routing(mode), on_forward=meter.on_forward)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            sample(model, process, labels, steps=3, routing=Routing(mode),
                   on_forward=meter.on_forward)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == (3 * len(model.moe_layers()) if mode == "dynamic" else 0), syncs
