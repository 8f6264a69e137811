"""Semantics of the four feed-forward variants, against the plain references in reference.py."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from reference import (
    combine_choices,
    expert_ffn,
    reference_diffmoe_train,
    reference_dynamic,
    reference_expert_choice,
    reference_local_dynamic,
    reference_predictor,
    reference_token_choice,
    router_scores,
)
from torch.testing import assert_close

from diffmoe.config import MoEConfig
from diffmoe.models.moe import (
    DenseFFN,
    FFNOutput,
    Routing,
    apply_threshold_updates,
    build_ffn,
    expert_capacity,
)
from diffmoe.models.moe import base as moe_base
from diffmoe.models.moe.diffmoe import (
    dynamic_counts,
    predictor_loss,
    threshold_targets,
    update_thresholds,
)
from diffmoe.models.moe.token_choice import load_balance_loss

# Fast paths against plain references, samples alone against in a batch, fp32 against float64:
# different computations that agree to a tolerance (make test reruns them on another code path).
pytestmark = pytest.mark.numerics

D, HIDDEN = 16, 32


def make(kind: str, num_experts: int = 4, capacity: float = 1.0, **kw):
    torch.manual_seed(0)
    moe = MoEConfig(type=kind, num_experts=num_experts, capacity=capacity, **kw)
    layer = build_ffn(moe, D, HIDDEN).double()
    # A larger router init than the paper's 0.006 so that scores differ clearly and top-k
    # selections are far from ties in these small tests.
    torch.nn.init.normal_(layer.router.weight_ED, std=0.5) if hasattr(layer, "router") else None
    return layer


def inputs(B=3, s=8, seed=1, requires_grad=True):
    torch.manual_seed(seed)
    return torch.randn(B, s, D, dtype=torch.float64, requires_grad=requires_grad)


def grads(layer, x, y):
    torch.manual_seed(5)
    w = torch.randn_like(y)
    params = [p for p in layer.parameters() if p.requires_grad]
    return torch.autograd.grad((y * w).sum(), [x] + params, allow_unused=True)


def check_against_reference(layer, x, out_y, ref_y):
    assert_close(out_y, ref_y)
    for g_fast, g_ref in zip(grads(layer, x, out_y), grads(layer, x, ref_y)):
        if g_ref is None:
            assert g_fast is None or torch.count_nonzero(g_fast) == 0
        else:
            assert_close(g_fast, g_ref)


@pytest.mark.parametrize("capacity", [1.0, 2.0, 0.5])
def test_diffmoe_training_matches_reference(capacity):
    layer = make("diffmoe", capacity=capacity).train()
    x = inputs()
    out = layer(x)
    k = expert_capacity(24, capacity, 4)
    check_against_reference(layer, x, out.y, reference_diffmoe_train(layer, x, k))


def test_diffmoe_training_each_expert_takes_exactly_k_of_the_pool():
    layer = make("diffmoe", num_experts=4, capacity=1.0).train()
    B, s = 4, 8
    out = layer(inputs(B, s))
    k = B * s * 1 // 4
    assert out.selection_mask().shape == (B * s, 4)
    assert out.selection_mask().sum(0).tolist() == [k] * 4
    assert out.counts_E.tolist() == [k] * 4
    # Global pool: an expert's k tokens need not be spread evenly over samples.
    per_sample = out.selection_mask().view(B, s, 4).sum(1)
    assert (per_sample != k // B).any()


def test_diffmoe_pool_crosses_samples_expert_choice_does_not():
    for kind, crosses in [("diffmoe", True), ("expert_choice", False)]:
        layer = make(kind).train()
        x = inputs(requires_grad=False)
        base = layer(x).y
        changed_any = False
        for seed in range(10):
            x2 = x.clone()
            torch.manual_seed(100 + seed)
            x2[1] = torch.randn(x.shape[1], D, dtype=x.dtype) * 3
            y2 = layer(x2).y
            # A crossing pool moves sample 0 by the outputs' size (~0.1), far beyond rounding.
            changed_any |= not torch.allclose(base[0], y2[0], rtol=0, atol=1e-9)
            if not crosses:
                # Expert choice takes k tokens of every sample whatever their values: the same
                # GEMM shapes with samples 0 and 2 in the same rows, so the same computation.
                assert torch.equal(base[0], y2[0]), kind
                assert torch.equal(base[2], y2[2]), kind
        assert changed_any == crosses, kind


def test_expert_choice_matches_reference():
    layer = make("expert_choice", capacity=1.0).train()
    x = inputs()
    out = layer(x)
    check_against_reference(layer, x, out.y, reference_expert_choice(layer, x, 8 // 4))
    assert out.selection_mask().view(3, 8, 4).sum(1).eq(2).all()


@pytest.mark.parametrize("capacity", [1.0, 2.0])
@pytest.mark.parametrize("dispatch", ["grouped_mm", "padded_bmm", "loop"])
def test_token_choice_matches_reference(capacity, dispatch):
    layer = make("token_choice", capacity=capacity, dispatch=dispatch).float()
    x = inputs().float().detach().requires_grad_(True)
    out = layer(x)
    ref = reference_token_choice(layer, x, int(capacity))
    assert_close(out.y, ref, rtol=1e-5, atol=1e-5)
    for g_fast, g_ref in zip(grads(layer, x, out.y), grads(layer, x, ref)):
        assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-5)
    assert out.counts_E.sum().item() == 24 * int(capacity)
    assert out.selection_mask().sum(1).eq(int(capacity)).all()


def test_token_choice_balance_loss_is_paper_formula():
    layer = make("token_choice")
    x = inputs(requires_grad=False)
    out = layer(x)
    scores = router_scores(layer, x.reshape(-1, D))
    top1 = scores.argmax(1)
    f = torch.bincount(top1, minlength=4).double() / top1.numel()
    expected = (scores.mean(0) * 4 * f).sum()
    assert_close(out.aux_loss, expected)
    # Perfect balance gives exactly 1.
    uniform = torch.full((8, 4), 0.25, dtype=torch.float64)
    assert_close(load_balance_loss(uniform, torch.tensor([2, 2, 2, 2])),
                 torch.tensor(1.0, dtype=torch.float64))


def test_one_expert_at_capacity_one_equals_dense_ffn():
    for kind in ("diffmoe", "expert_choice", "token_choice"):
        layer = make(kind, num_experts=1, capacity=1.0).train()
        dense = DenseFFN(D, HIDDEN).double()
        with torch.no_grad():
            dense.fc1.weight.copy_(layer.experts.w1_EDF[0].t())
            dense.fc1.bias.copy_(layer.experts.b1_EF[0])
            dense.fc2.weight.copy_(layer.experts.w2_EFD[0].t())
            dense.fc2.bias.copy_(layer.experts.b2_ED[0])
        x = inputs(requires_grad=False)
        assert_close(layer(x).y, dense(x).y), kind


def test_predictor_gets_no_gradient_from_diffusion_loss_and_changes_none():
    layer = make("diffmoe").train()
    x = inputs()
    out = layer(x)
    main = (out.y * torch.randn_like(out.y)).sum()
    pred_params = list(layer.predictor.parameters())
    others = [p for n, p in layer.named_parameters() if not n.startswith("predictor.")]
    g_pred = torch.autograd.grad(main, pred_params, retain_graph=True, allow_unused=True)
    assert all(g is None for g in g_pred)
    g_main = torch.autograd.grad(main, [x] + others, retain_graph=True)
    g_both = torch.autograd.grad(main + out.predictor_loss, [x] + others, retain_graph=True)
    for a, b in zip(g_main, g_both):
        assert torch.equal(a, b)  # the BCE's branch reaches none of these: the same backward
    # ...while the BCE does train the predictor.
    g_bce = torch.autograd.grad(out.predictor_loss, pred_params)
    assert all(g.abs().sum() > 0 for g in g_bce)


def test_predictor_loss_is_bce_against_selection_mask():
    layer = make("diffmoe").train()
    out = layer(inputs(requires_grad=False))
    p = torch.sigmoid(out.predictor_logits_SE)
    o = out.selection_mask().double()
    expected = -(o * p.log() + (1 - o) * (1 - p).log()).mean()
    assert_close(out.predictor_loss.double(), expected)


def test_threshold_update_is_eq17():
    layer = make("diffmoe", threshold_ema=0.95).train()
    with torch.no_grad():
        layer.thresholds_E.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    before = layer.thresholds_E.clone()
    x = inputs(requires_grad=False)
    out = layer(x)
    # The forward only records the targets q_e: no side effect on the thresholds.
    assert torch.equal(layer.thresholds_E, before)
    k = 24 // 4
    probs = torch.sigmoid(out.predictor_logits_SE.float())
    q = torch.stack([torch.sort(probs[:, e], descending=True).values[k - 1] for e in range(4)])
    assert torch.equal(out.threshold_targets_E, q)  # one sigmoid of one tensor, then a selection
    apply_threshold_updates([layer], [out.threshold_targets_E])
    assert_close(layer.thresholds_E, 0.95 * before + 0.05 * q.to(before.dtype))
    # Eval forwards record no targets.
    layer.eval()
    assert layer(x, Routing("dynamic")).threshold_targets_E is None


def test_threshold_updates_need_one_target_per_layer():
    layer = make("diffmoe").train()
    with pytest.raises(ValueError, match="2 threshold targets for 1 DiffMoE layers"):
        apply_threshold_updates([layer], [torch.zeros(4), torch.zeros(4)])


def test_threshold_helpers_vectorised_match_loop():
    torch.manual_seed(3)
    logits = torch.randn(50, 6)
    q = threshold_targets(logits, 7)
    for e in range(6):
        assert q[e] == torch.sigmoid(logits[:, e]).sort(descending=True).values[6]
    tau = torch.zeros(6)
    update_thresholds(tau, q, 0.9)
    assert_close(tau, 0.1 * q)


@pytest.mark.parametrize("dispatch", ["grouped_mm", "padded_bmm", "loop"])
def test_dynamic_inference_processes_exactly_the_predicted_count(dispatch):
    layer = make("diffmoe", dispatch=dispatch).float().eval()
    x = inputs(requires_grad=False).float()
    with torch.no_grad():
        logits = layer.predictor(x.reshape(-1, D))
        # Thresholds at different quantiles so every expert gets a different count.
        tau = torch.stack([torch.sigmoid(logits[:, e]).quantile(q)
                           for e, q in enumerate([0.1, 0.5, 0.8, 0.97])])
        layer.thresholds_E.copy_(tau)
    out = layer(x, Routing("dynamic"))
    expected_counts = (torch.sigmoid(logits) > tau).sum(0)
    assert out.counts_E.tolist() == expected_counts.tolist()
    assert out.selection_mask().sum(0).tolist() == expected_counts.tolist()
    ref, ref_counts = reference_dynamic(layer, x, tau)
    assert ref_counts == expected_counts.tolist()
    assert_close(out.y, ref, rtol=1e-5, atol=1e-6)


def test_constant_threshold_extremes():
    layer = make("diffmoe").eval()
    x = inputs(requires_grad=False)
    everything = layer(x, Routing("threshold", 0.0))
    assert everything.counts_E.tolist() == [24] * 4
    nothing = layer(x, Routing("threshold", 1.0))
    assert nothing.counts_E.tolist() == [0] * 4
    assert torch.count_nonzero(nothing.y) == 0
    static = layer(x, Routing("static"))
    assert static.counts_E.tolist() == [6] * 4


def test_dynamic_counts_helper():
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0], [-3.0, 0.5]])
    tau = torch.tensor([0.4, 0.6])
    # sigmoid: [[.5,.88],[.73,.27],[.05,.62]]
    assert dynamic_counts(logits, tau).tolist() == [2, 2]


def test_fine_grained_experts():
    layer = make("diffmoe", num_experts=4, granularity=2).train()
    assert layer.num_experts == 8 and layer.experts.hidden == HIDDEN // 2
    out = layer(inputs())
    k = 24 // 4  # each of the g*E experts still takes S*C/E tokens
    assert out.selection_mask().sum(0).tolist() == [k] * 8
    x = inputs()
    check_against_reference(layer, x, layer(x).y, reference_diffmoe_train(layer, x, k))


def test_shared_experts_add_a_dense_path():
    layer = make("diffmoe", shared_experts=2).train()
    assert layer.shared is not None and layer.shared.fc1.out_features == 2 * HIDDEN
    x = inputs()
    out = layer(x)
    check_against_reference(layer, x, out.y, reference_diffmoe_train(layer, x, 6))


@pytest.mark.parametrize("kind", ["dense", "token_choice", "expert_choice", "diffmoe"])
def test_one_interface(kind):
    layer = make(kind).train()
    out = layer(inputs())
    assert isinstance(out, FFNOutput) and out.y.shape == (3, 8, D)
    if kind == "dense":
        assert out.selection_mask() is None and out.counts_E is None
    else:
        assert out.selection_mask().shape == (24, 4) and out.counts_E.shape == (4,)
        assert (out.aux_loss is not None) == (kind == "token_choice")
        assert (out.predictor_logits_SE is not None) == (kind == "diffmoe")


def test_predictor_loss_function():
    logits = torch.zeros(4, 2)
    mask = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=torch.bool)
    assert_close(predictor_loss(logits, mask), torch.log(torch.tensor(2.0)))


def test_expert_capacity_rule():
    assert expert_capacity(256, 1.0, 16) == 16
    assert expert_capacity(100, 1.0, 16) == 6
    assert expert_capacity(4, 0.1, 16) == 1  # at least one token
    assert expert_capacity(8, 4.0, 2) == 8  # at most the pool


def test_expert_ffn_reference_consistent_with_bank():
    layer = make("diffmoe")
    x = torch.randn(5, D, dtype=torch.float64)
    y = layer.experts.forward_equal(x.unsqueeze(0).expand(4, 5, D).contiguous())
    for e in range(4):
        assert_close(y[e], torch.stack([expert_ffn(layer, e, r) for r in x]))


# -- the fast paths against plain references ---------------------------------------------------

UNEQUAL_COUNTS = [5, 0, 9, 2]  # an expert without rows among them


@pytest.mark.parametrize("kernel", ["grouped_mm", "padded_bmm", "loop"])
def test_grouped_kernels_match_the_per_row_reference_values_and_gradients(kernel):
    """MoELayer.run_grouped with each kernel against Eq. 7 row by row (expert_ffn), with the
    gradients of the pool, the router weights and every expert weight (token choice trains
    through them); one expert gets no row, and a token may be taken by several experts."""
    layer = make("token_choice", dispatch=kernel).float()
    bank = layer.experts
    counts = torch.tensor(UNEQUAL_COUNTS)
    torch.manual_seed(2)
    x = torch.randn(12, D, requires_grad=True)
    w = torch.rand(int(counts.sum()), requires_grad=True)
    tok = torch.randint(0, 12, (int(counts.sum()),))
    experts = torch.repeat_interleave(torch.arange(4), counts).tolist()
    ref = torch.zeros(12, D).index_add(0, tok, torch.stack(
        [w[i] * expert_ffn(layer, e, x[t]) for i, (e, t) in enumerate(zip(experts, tok))]))
    fast = layer.run_grouped(x, tok, w, counts)
    assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    inputs = [x, w, bank.w1_EDF, bank.b1_EF, bank.w2_EFD, bank.b2_ED]
    for g_fast, g_ref in zip(torch.autograd.grad((fast * g).sum(), inputs),
                             torch.autograd.grad((ref * g).sum(), inputs)):
        assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-5)


def test_dynamic_selection_breaks_ties_as_the_authors_topk():
    """Tokens that differ only where the router does not look tie in score (but not in predicted
    probability, so the counts cut through groups of tied tokens); every expert still takes
    exactly the tokens, in the order, of the authors' ``scores[:, e].topk(k_e)``, and the output
    is Eq. 7 over those choices."""
    layer = make("diffmoe").eval()
    torch.manual_seed(4)
    x = torch.randn(3, 12, D, dtype=torch.float64)
    with torch.no_grad():
        layer.router.weight_ED[:, D // 2:] = 0.0
        x[..., :D // 2] = x[:1, :4, :D // 2].repeat(3, 3, 1)  # 36 tokens, 4 distinct scores
    x_SD = x.reshape(-1, D)
    with torch.no_grad():
        probs = torch.sigmoid(layer.predictor(x_SD))
        layer.thresholds_E.copy_(probs.quantile(0.6, dim=0))
        out = layer(x, Routing("dynamic"))
        scores = layer.router(x_SD)
    counts = out.counts_E.tolist()
    assert len(set(counts)) > 1 and all(0 < k < 36 for k in counts)
    theirs = [scores[:, e].topk(k).indices for e, k in enumerate(counts)]
    assert torch.equal(out.tokens_T, torch.cat(theirs))
    chosen = {e: t.tolist() for e, t in enumerate(theirs)}
    assert_close(out.y.reshape(-1, D), combine_choices(layer, x_SD, scores, chosen))


def test_the_selection_mask_is_built_from_the_rows_and_the_output_is_immutable():
    """The selection mask is built from the routed rows when read, and at inference equals the
    one a training forward builds from the same choices; the predictor's BCE is training-only;
    the output cannot be changed after the forward."""
    layer = make("diffmoe").eval()
    x = inputs(requires_grad=False)
    static = layer(x, Routing("static"))
    assert static.predictor_loss is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        static.counts_E = None
    mask = static.selection_mask()
    scores = router_scores(layer, x.reshape(-1, D))
    expected = torch.zeros(24, 4, dtype=torch.bool)
    for e in range(4):
        expected[scores[:, e].topk(6).indices, e] = True
    assert torch.equal(mask, expected)
    dynamic = layer(x, Routing("threshold", 0.5))
    assert dynamic.predictor_loss is None
    assert dynamic.selection_mask().sum(0).tolist() == dynamic.counts_E.tolist()
    trained = layer.train()(x)
    assert torch.equal(trained.selection_mask(), expected) and trained.predictor_loss is not None


@pytest.mark.parametrize("device,capability,dtype,widths,kernel", [
    ("cuda", (9, 0), torch.bfloat16, (16, 32), "grouped_mm"),  # H100/H200
    ("cuda", (10, 0), torch.bfloat16, (16, 32), "grouped_mm"),  # B200
    ("cuda", (8, 0), torch.bfloat16, (16, 32), "padded_bmm"),  # A100: torch's slow fallback
    ("cuda", (12, 0), torch.bfloat16, (16, 32), "padded_bmm"),
    ("cuda", (9, 0), torch.float32, (16, 32), "padded_bmm"),  # the fast kernel is bf16 only
    ("cuda", (9, 0), torch.bfloat16, (12, 32), "padded_bmm"),  # 24-byte rows: not aligned
    ("cpu", None, torch.bfloat16, (16, 32), "padded_bmm"),
    ("cpu", None, torch.float32, (16, 32), "padded_bmm")])
def test_auto_kernel_rule(monkeypatch, caplog, device, capability, dtype, widths, kernel):
    """grouped_mm only with bf16 rows, aligned for bf16, on a device where torch has its fast
    kernel; each choice logged once."""
    monkeypatch.setattr(moe_base, "_KERNEL_CHOICES", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    with caplog.at_level(logging.INFO, logger=moe_base.__name__):
        for _ in range(2):
            assert moe_base.auto_kernel(torch.device(device, 0), dtype, widths) == kernel
    assert [r.getMessage().split(": ")[1].split(" ")[0] for r in caplog.records] == [kernel]


@pytest.mark.parametrize("counts,kernel", [
    ([8, 8, 8, 8], "padded_bmm"),      # no padding
    ([10, 8, 8, 8], "padded_bmm"),     # 6% padding
    ([20, 4, 4, 4], "loop"),           # padding would more than double the rows
    ([0, 0, 3, 0], "loop")])
def test_auto_runs_counts_on_the_host_one_expert_at_a_time_when_padding_is_wasteful(
        monkeypatch, counts, kernel):
    """With the counts already on the host (dynamic inference), ``auto`` pads only where padding
    adds at most PADDED_BMM_MAX_WASTE of the rows; either way the layer output is the same."""
    cfg = MoEConfig(type="diffmoe", num_experts=4)
    layer = build_ffn(cfg, 16, 32).eval()
    assert layer.experts.kernel(torch.device("cpu"), torch.float32, counts) == kernel
    assert layer.experts.kernel(torch.device("cpu"), torch.float32) == "padded_bmm"
    ran = []
    original = moe_base.padded
    monkeypatch.setattr(moe_base, "padded", lambda *a: ran.append("padded_bmm") or original(*a))
    x = torch.randn(sum(counts) + 5, 16)
    tok = torch.randperm(x.shape[0])[:sum(counts)]
    w = torch.rand(sum(counts))
    counts_E = torch.tensor(counts)
    with torch.no_grad():
        got = layer.run_grouped(x, tok, w, counts_E, host_counts=counts)
        expected = torch.zeros_like(x)
        for e, (rows, weights) in enumerate(zip(tok.split(counts), w.split(counts))):
            for t, wt in zip(rows.tolist(), weights.tolist()):
                expected[t] += wt * expert_ffn(layer, e, x[t])
    assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert ran == (["padded_bmm"] if kernel == "padded_bmm" else [])


def test_rows_reach_the_experts_once_cast_to_the_autocast_dtype(monkeypatch):
    """Under bf16 autocast the pool arrives in float32 (LayerNorm, modulate); it is cast once
    before the gather, so the experts (and the kernel choice) see bf16 rows."""
    seen = []
    original = moe_base.gather_rows

    def spy(x_SD, tok_T):
        rows = original(x_SD, tok_T)
        seen.append((x_SD.dtype, rows.dtype))
        return rows

    monkeypatch.setattr(moe_base, "gather_rows", spy)
    for kind, routing in [("token_choice", Routing()), ("diffmoe", Routing("threshold", 0.5))]:
        layer = make(kind).float().eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(inputs(requires_grad=False).float(), routing)
        assert out.y.dtype == torch.float32
    assert seen == [(torch.float32, torch.bfloat16)] * 2


def spread_thresholds(layer, x, quantiles=(0.1, 0.5, 0.8, 0.97)):
    """Set each expert's threshold at a different quantile of its predictions on ``x``, so every
    expert takes a different number of tokens; returns them."""
    with torch.no_grad():
        probs = torch.sigmoid(layer.predictor(x.reshape(-1, D)))
        tau = torch.stack([probs[:, e].quantile(q) for e, q in enumerate(quantiles)])
        layer.thresholds_E.copy_(tau.to(layer.thresholds_E.dtype))
    return layer.thresholds_E.clone()


@pytest.mark.parametrize("dispatch", ["grouped_mm", "padded_bmm", "loop"])
def test_predictor_mode_matches_reference_values_and_gradients(dispatch):
    layer = make("diffmoe", dispatch=dispatch).float().eval()
    x = inputs().float().detach().requires_grad_(True)
    tau = spread_thresholds(layer, x)
    out = layer(x, Routing("predictor"))
    ref = reference_predictor(layer, x, tau)
    assert_close(out.y, ref, rtol=1e-5, atol=1e-6)
    for g_fast, g_ref in zip(grads(layer, x, out.y), grads(layer, x, ref)):
        if g_ref is None:
            assert g_fast is None or torch.count_nonzero(g_fast) == 0
        else:
            assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-5)


def test_predictor_mode_takes_the_predicted_tokens_and_the_eq14_counts():
    layer = make("diffmoe").eval()
    x = inputs(requires_grad=False)
    tau = spread_thresholds(layer, x)
    out = layer(x, Routing("predictor"))
    predicted = torch.sigmoid(layer.predictor(x.reshape(-1, D))) > tau
    assert torch.equal(out.selection_mask(), predicted)
    assert out.counts_E.tolist() == layer(x, Routing("dynamic")).counts_E.tolist()
    assert len(set(out.counts_E.tolist())) == 4  # the thresholds gave every expert its own count


def test_predictor_mode_output_of_a_sample_does_not_depend_on_its_batch():
    layer = make("diffmoe").eval()
    x = inputs(B=4, requires_grad=False)
    spread_thresholds(layer, x)
    for mode, independent in (("predictor", True), ("dynamic", False)):
        together = layer(x, Routing(mode)).y
        alone = torch.cat([layer(x[b:b + 1], Routing(mode)).y for b in range(4)])
        if independent:
            assert_close(alone, together, rtol=0, atol=1e-12)
        else:  # the paper's dynamic mode: tokens compete across the batch
            assert not torch.allclose(alone, together)


def test_sample_scope_trains_as_expert_choice_with_a_predictor():
    layer = make("diffmoe", pool_scope="sample").train()
    x = inputs()
    out = layer(x)
    check_against_reference(layer, x, out.y, reference_expert_choice(layer, x, 8 // 4))
    assert out.selection_mask().view(3, 8, 4).sum(1).eq(2).all()  # k = s*C/E in every sample
    p = torch.sigmoid(out.predictor_logits_SE)
    o = out.selection_mask().double()
    assert_close(out.predictor_loss.double(), -(o * p.log() + (1 - o) * (1 - p).log()).mean())
    # Threshold targets: the k-th largest prediction of the pool, k = the selection's size B*2.
    assert torch.equal(out.threshold_targets_E, threshold_targets(out.predictor_logits_SE, 6))


def test_sample_scope_static_inference_is_expert_choice():
    layer = make("diffmoe", pool_scope="sample").eval()
    x = inputs()
    out = layer(x, Routing("static"))
    check_against_reference(layer, x, out.y, reference_expert_choice(layer, x, 2))


@pytest.mark.parametrize("mode", ["dynamic", "threshold"])
def test_sample_scope_dynamic_counts_per_sample_values_and_gradients(mode):
    layer = make("diffmoe", pool_scope="sample").eval()
    x = inputs()
    tau = spread_thresholds(layer, x)
    routing = Routing(mode, 0.5)
    if mode == "threshold":
        tau = torch.full_like(tau, 0.5)
    out = layer(x, routing)
    ref, counts_BE = reference_local_dynamic(layer, x, tau)
    check_against_reference(layer, x, out.y, ref)
    assert out.selection_mask().view(3, 8, 4).sum(1).tolist() == counts_BE
    assert len({c for row in counts_BE for c in row}) > 2  # counts differ across samples


def test_sample_scope_pool_crosses_no_samples_in_any_mode():
    layer = make("diffmoe", pool_scope="sample")
    x = inputs(requires_grad=False)
    spread_thresholds(layer, x)
    x2 = x.clone()
    x2[1] = torch.randn(x.shape[1], D, dtype=x.dtype) * 3
    for training, mode in ((True, "static"), (False, "static"), (False, "dynamic")):
        layer.train(training)
        a, b = layer(x, Routing(mode)).y, layer(x2, Routing(mode)).y
        # A different computation: sample 1 changes the experts' row counts, so the GEMMs run in
        # other shapes and round differently per CPU code path (float64: ~1e-16). A pool that
        # crossed samples would move samples 0 and 2 by the outputs' own size (~0.1).
        for kept in (0, 2):
            assert_close(a[kept], b[kept], rtol=0, atol=1e-12,
                         msg=lambda m: f"{m}\n(training={training}, mode={mode})")


def test_sample_scope_needs_the_rank_pool():
    with pytest.raises(ValueError, match="per-sample pool scope"):
        build_ffn(MoEConfig(type="diffmoe", num_experts=4, pool_scope="sample"), D, HIDDEN,
                  token_pool="global")
