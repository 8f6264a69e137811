"""Run under 2-process torchrun by test_scale.py.

``pool``: a cross-rank DiffMoE pool against a single process. Every rank builds the same model;
rank r runs half of one fixed global batch with ``token_pool=global`` and averages gradients
across ranks (as DDP does); rank 0 also runs the whole batch through an identical model with a
per-process pool and no collective. Outputs, gradients and thresholds must agree.

``train`` (or ``resume``, continuing a run): a few training steps of a config (DDP or FSDP2 per
the overrides), then a report of whether every rank's replicated tensors (all weights under DDP;
the thresholds under FSDP, whose weights are shards) equal rank 0's.

``precision``: one bf16 training forward of the same batch under FSDP2 (bf16 parameters) and
under DDP with autocast, from the same weights: the inputs the timestep embedder and the first
block saw under FSDP2 (dtype and values), and both losses, averaged over ranks.

``init``: the model and EMA as the trainer builds them under FSDP2 (on the meta device, each rank
filling its shards), gathered whole, against the model built whole on the CPU from the same seed,
for several configs (``config`` is a comma-separated list of ``path[+override...]``).

``loaded``: resume a run under this world size and engine, report whether the state each rank
holds before any step, gathered whole, equals the whole tensors of the checkpoint it resumed from
(weights, EMA and AdamW state) and the shape of each rank's local weights, then train on to
``train.steps``.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from diffmoe import distributed
from diffmoe.config import load_config
from diffmoe.models import build_model
from diffmoe.models.moe import apply_threshold_updates, diffmoe_layers

GLOBAL_BATCH = 8
PERTURB_STD = 0.05


def fixed_batch(cfg):
    g = torch.Generator().manual_seed(123)
    m = cfg.model
    x = torch.randn(GLOBAL_BATCH, m.in_channels, m.input_size, m.input_size, generator=g)
    t = torch.rand(GLOBAL_BATCH, generator=g) * 1000
    y = torch.randint(0, m.num_classes, (GLOBAL_BATCH,), generator=g)
    return x, t, y


def loss_of(model, x, t, y, average_over_ranks=True):
    """The loss and output of one training forward, with the thresholds' update (Eq. 17)
    applied as the trainer applies it."""
    out = model(x, t, y)
    apply_threshold_updates(diffmoe_layers(model),
                            [o.threshold_targets_E for o in out.layers], average_over_ranks)
    return out.prediction.pow(2).mean() + out.predictor_loss, out.prediction


def check_pool(config: str, result: str, overrides: list[str]) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(config, overrides + ["model.class_dropout=0"])
    torch.manual_seed(0)
    model = build_model(cfg.model, token_pool="global").train()
    with torch.no_grad():  # leave adaLN-Zero's all-zero start, so that outputs depend on routing
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=PERTURB_STD)
    single, per_rank = (build_model(cfg.model).train() for _ in range(2))  # per-rank pools
    for copy_ in (single, per_rank):  # per_rank, the control, must NOT match the single process
        copy_.load_state_dict(model.state_dict())
    x, t, y = fixed_batch(cfg)
    part = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    _, control = loss_of(per_rank, x[part], t[part], y[part], average_over_ranks=False)
    controls = [torch.empty_like(control) for _ in range(world)]
    dist.all_gather(controls, control.detach())
    loss, out = loss_of(model, x[part], t[part], y[part])
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    dist.all_reduce(grads)
    grads /= world
    outs = [torch.empty_like(out) for _ in range(world)]
    dist.all_gather(outs, out.detach())
    taus = torch.cat([m.thresholds_E for m in model.moe_layers()])
    if rank == 0:
        ref_loss, ref_out = loss_of(single, x, t, y, average_over_ranks=False)
        ref_loss.backward()
        ref_grads = torch.cat([p.grad.flatten() for p in single.parameters()
                               if p.grad is not None])
        ref_taus = torch.cat([m.thresholds_E for m in single.moe_layers()])
        report = {
            "out_max_diff": float((torch.cat(outs) - ref_out.detach()).abs().max()),
            "out_max": float(ref_out.detach().abs().max()),
            "per_rank_pool_out_max_diff": float((torch.cat(controls) - ref_out.detach())
                                                .abs().max()),
            "grad_max_diff": float((grads - ref_grads).abs().max()),
            "grad_max": float(ref_grads.abs().max()),
            "tau_max_diff": float((taus - ref_taus).abs().max()),
            "tau_sum": float(ref_taus.sum()),
            "num_grads": int(grads.numel()),
        }
        with open(result, "w") as fh:
            json.dump(report, fh)


def check_train(config: str, result: str, overrides: list[str], resume: bool = False) -> None:
    from diffmoe.train import Trainer

    # A continuation raises train.steps, which moves the end of the config's cosine schedule:
    # an optimisation change, accepted as such.
    trainer = Trainer(load_config(config, overrides), resume=resume, accept_changes=resume)
    trainer.train()
    report, sharded = {}, 0
    for name, module in (("model", trainer.model.module), ("ema", trainer.ema)):
        for key, value in module.state_dict().items():
            if hasattr(value, "to_local"):  # an FSDP shard: each rank holds another part
                sharded += 1
                continue
            ref = value.clone()
            dist.broadcast(ref, src=0)
            # Every rank applies the same reduced gradients: the same computation, bitwise.
            report[f"{name}.{key}"] = bool(torch.equal(ref, value))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, report)
    if dist.get_rank() == 0:
        with open(result, "w") as fh:
            json.dump({"ranks": gathered, "fsdp": trainer.model.fsdp, "sharded": sharded,
                       "step": trainer.step}, fh)
    trainer.close()


PRECISION_T = (777.0, 999.0)  # timesteps bf16 cannot hold (its steps are 4 above 512)


def check_precision(config: str, result: str, overrides: list[str]) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from diffmoe import parallel

    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(config, overrides + ["model.class_dropout=0"])
    torch.manual_seed(0)
    fsdp = build_model(cfg.model).train()
    with torch.no_grad():  # leave adaLN-Zero's all-zero start, so that the loss has a size
        for p in fsdp.parameters():
            p.add_(torch.randn_like(p), alpha=PERTURB_STD)
    ddp = build_model(cfg.model).train()
    ddp.load_state_dict(fsdp.state_dict())
    parallel.shard(fsdp, "bf16")
    ddp = DistributedDataParallel(ddp, broadcast_buffers=False)
    seen = {}

    def capture(name):
        def hook(module, args):
            seen[name] = {"dtype": str(args[0].dtype), "values": args[0].flatten()[:4].tolist()}
        return hook

    fsdp.t_embedder.register_forward_pre_hook(capture("t_embedder"))
    fsdp.blocks[0].register_forward_pre_hook(capture("block0"))
    x, _, y = fixed_batch(cfg)
    t = torch.tensor(PRECISION_T).repeat(GLOBAL_BATCH // len(PRECISION_T))
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    part = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    losses = {}
    for name, net in (("fsdp", fsdp), ("ddp", ddp)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x[part], t[part], y[part])
            loss = (out.prediction.float() - target[part]).pow(2).mean()
        loss.backward()
        losses[name] = float(distributed.all_mean(loss.detach().double()))
    if rank == 0:
        with open(result, "w") as fh:
            json.dump({"seen": seen, "losses": losses, "t": list(PRECISION_T)}, fh)


def check_init(configs: str, result: str, overrides: list[str]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from diffmoe.train import step_trainer

    info = distributed.DistInfo(dist.get_rank(), dist.get_world_size())
    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
    report = {}
    for spec in configs.split(","):
        path, *extra = spec.split("+")
        cfg = load_config(path, overrides + extra + ["train.parallel=fsdp"])
        trainer = step_trainer(cfg, info, torch.device("cpu"), loader=None)
        held = {name: get_model_state_dict(m, options=whole)
                for name, m in (("model", trainer.model.module), ("ema", trainer.ema))}
        sharded = all(hasattr(p, "to_local") for p in trainer.model.module.parameters())
        if dist.get_rank() == 0:
            torch.manual_seed(cfg.train.seed)
            ref = build_model(cfg.model, cfg.train.token_pool).state_dict()
            report[spec] = sharded and all(
                held[name].keys() == ref.keys()
                and all(torch.equal(held[name][k], ref[k]) for k in ref) for name in held)
    if dist.get_rank() == 0:
        with open(result, "w") as fh:
            json.dump(report, fh)


def check_loaded(config: str, result: str, overrides: list[str]) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    from diffmoe.checkpoint import open_checkpoint
    from diffmoe.train import Trainer

    trainer = Trainer(load_config(config, overrides), resume=True, accept_changes=True)
    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
    module = trainer.model.module
    held = {"model": get_model_state_dict(module, options=whole),
            "ema": get_model_state_dict(trainer.ema, options=whole),
            "optimizer": get_optimizer_state_dict(module, trainer.optimizer, options=whole)}
    local = {k: list(v.to_local().shape) for k, v in module.state_dict().items()
             if hasattr(v, "to_local")}
    if dist.get_rank() == 0:
        ckpt = open_checkpoint(trainer.run.opening.checkpoint)
        report = {"step": trainer.step, "local_shapes": local, "fsdp": trainer.model.fsdp}
        for name in ("model", "ema"):
            saved = ckpt.tensors(name)
            report[name] = sorted(saved) == sorted(held[name]) and all(
                torch.equal(saved[k], held[name][k]) for k in saved)
        saved = ckpt.tensors("optimizer")
        if not ckpt.sharded:  # a checkpoint of one file keys AdamW's state by parameter index
            names = [n for n, _ in module.named_parameters()]
            saved = {f"state.{names[int(i)]}.{k}": v for key, v in saved.items()
                     for _, i, k in [key.split(".", 2)]}
        flat = {f"state.{p}.{k}": v for p, st in held["optimizer"]["state"].items()
                for k, v in st.items()}
        report["optimizer"] = sorted(saved) == sorted(flat) and all(
            torch.equal(saved[k], flat[k].reshape(saved[k].shape)) for k in saved)
        report["optimizer_entries"] = len(saved)
    trainer.train()
    if dist.get_rank() == 0:
        report["final_step"] = trainer.step
        with open(result, "w") as fh:
            json.dump(report, fh)
    trainer.close()


def main() -> None:
    what, config, result, *overrides = sys.argv[1:]
    dist.init_process_group("gloo")
    finished = False
    try:
        if what == "resume":
            check_train(config, result, overrides, resume=True)
        else:
            {"pool": check_pool, "train": check_train,
             "loaded": check_loaded, "precision": check_precision,
             "init": check_init}[what](config, result, overrides)
        finished = True
    finally:
        distributed.teardown(wait_for_others=finished)


if __name__ == "__main__":
    main()
