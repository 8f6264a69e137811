"""Evaluation: metrics against closed forms and hand-built cases, reference files and caches,
and the eval / sweep-thresholds / analyze / fid commands on a tiny checkpoint."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import error_line, run_cli
from torch.testing import assert_close

from diffmoe.capacity import CapacityMeter, sample_capacities
from diffmoe.cli import main
from diffmoe.config import ModelConfig, MoEConfig
from diffmoe.data import build_dataset
from diffmoe.diffusion import FlowMatching
from diffmoe.errors import DataError
from diffmoe.evaluation.heldout import HeldOutSet, heldout_loss
from diffmoe.evaluation.inception import FEATURE_DIM, InceptionFeatures, default_extractor
from diffmoe.evaluation.metrics import (
    FeatureStats,
    compare,
    frechet_distance,
    kernel_inception_distance,
    precision_recall,
)
from diffmoe.evaluation.npz import NpzSampleWriter
from diffmoe.evaluation.reference import dataset_reference, load_reference, save_stats
from diffmoe.models import build_model
from diffmoe.models.moe import FFNOutput, Routing


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFMOE_CACHE_DIR", str(tmp_path / "cache"))


def test_frechet_distance_of_diagonal_gaussians_is_closed_form():
    a, b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 9.0])
    mu1, mu2 = torch.zeros(3), torch.tensor([1.0, 2.0, 0.0])
    expected = 1 + 4 + ((a + b) - 2 * (a * b).sqrt()).sum()
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(
        float(expected), rel=1e-9)


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_a_shift():
    feats = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    same = FeatureStats.from_features(feats)
    assert abs(frechet_distance(same.mu, same.sigma, same.mu, same.sigma)) < 1e-8
    shifted = FeatureStats.from_features(feats + 0.5)
    assert frechet_distance(same.mu, same.sigma, shifted.mu, shifted.sigma) == pytest.approx(
        16 * 0.25, rel=1e-6)


def test_kid_small_for_one_distribution_large_for_two():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 8, generator=gen), torch.randn(300, 8, generator=gen)
    same, _ = kernel_inception_distance(a, b, subsets=20, subset_size=100)
    apart, _ = kernel_inception_distance(a, b + 1.0, subsets=20, subset_size=100)
    assert abs(same) < 0.05 and apart > 10 * abs(same) and apart > 0.1


def test_precision_recall_hand_built():
    grid = torch.stack(torch.meshgrid(torch.arange(5.0), torch.arange(5.0), indexing="ij"),
                       -1).reshape(-1, 2)
    assert precision_recall(grid, grid.clone()) == (1.0, 1.0)
    far = grid + 100.0
    assert precision_recall(grid, far) == (0.0, 0.0)
    # Half the generated points on the real grid, half far away; the real grid is covered by the
    # generated half that lies on it only where its 3-NN balls reach.
    half = torch.cat([grid[:12], far[12:]])
    precision, _ = precision_recall(grid, half)
    assert precision == pytest.approx(12 / 25)


def test_too_few_samples_are_clear_errors():
    with pytest.raises(DataError, match="at least 2 images"):
        FeatureStats.from_features(torch.randn(1, 4))
    with pytest.raises(DataError, match="more than 3 samples"):
        precision_recall(torch.randn(3, 4), torch.randn(10, 4))


def test_rank_deficient_covariance_is_warned_about():
    small = FeatureStats.from_features(torch.randn(10, 32))
    result = compare(small, small)
    assert any("rank < 32" in w for w in result["warnings"])
    big = FeatureStats.from_features(torch.randn(100, 32))
    assert not compare(big, big)["warnings"]


def test_sample_capacities_hand_built():
    # 2 samples x 4 tokens, 2 experts: sample 0 has 3 of its 4 tokens taken by expert 0 and
    # all 4 by expert 1; sample 1 has 1 token taken by expert 0.
    out = FFNOutput(y=torch.zeros(2, 4, 1), tokens_T=torch.tensor([0, 1, 2, 4, 0, 1, 2, 3]),
                    counts_E=torch.tensor([4, 4]), num_tokens=8, base_experts=2)
    assert_close(sample_capacities(out, 2), torch.tensor([7 / 4, 1 / 4]))
    # Their mean is the layer's C of Eq. 9 when samples have equal token counts.
    from diffmoe.capacity import forward_capacity
    assert_close(sample_capacities(out, 2).mean(), forward_capacity([out]))


def test_npz_writer_streams_the_adm_layout_and_aborts_cleanly(tmp_path):
    x = torch.randint(0, 255, (5, 3, 4, 4), dtype=torch.uint8)
    w = NpzSampleWriter(tmp_path / "s.npz", 5, 4, 4, 3)
    w.add(x[:2], torch.tensor([0, 1]))
    w.add(x[2:], torch.tensor([2, 3, 4]))
    w.close()
    data = np.load(tmp_path / "s.npz")
    assert (data["arr_0"] == x.permute(0, 2, 3, 1).numpy()).all()
    assert data["arr_1"].tolist() == [0, 1, 2, 3, 4]
    broken = NpzSampleWriter(tmp_path / "b.npz", 5, 4, 4, 3)
    broken.add(x[:2], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="wrote 2 of 5"):
        broken.close()
    assert list(tmp_path.iterdir()) == [tmp_path / "s.npz"]


@pytest.mark.parametrize("arrays, fragment", [
    ({"mu": np.zeros(10), "sigma": np.eye(10)}, "'mu' has shape (10,), expected (2048,)"),
    ({"mu": np.zeros(FEATURE_DIM), "sigma": np.eye(3)}, "'sigma' has shape (3, 3)"),
    ({"arr_0": np.zeros((4, 8, 8), np.uint8)}, "'arr_0' must be uint8 images"),
    ({"arr_0": np.zeros((4, 8, 8, 3), np.float32)}, "'arr_0' must be uint8 images"),
    ({"images": np.zeros(3)}, "neither 'mu'/'sigma' nor 'arr_0'"),
])
def test_bad_reference_files(tmp_path, arrays, fragment):
    path = tmp_path / "ref.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError) as err:
        load_reference(str(path), 10)
    assert fragment in str(err.value)


def test_unreadable_and_missing_reference_files(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_reference(str(bad), 10)
    with pytest.raises(DataError, match="unknown dataset"):
        load_reference("nosuchset:train:10", 10)
    with pytest.raises(DataError, match="asks for 5000 images"):
        load_reference("digits:test:5000", 10)


def test_statistics_reference_gives_fid_only(tmp_path):
    feats = torch.randn(40, FEATURE_DIM, generator=torch.Generator().manual_seed(1))
    stats = FeatureStats.from_features(feats)
    path = tmp_path / "adm_ref.npz"
    np.savez(path, mu=stats.mu.numpy(), sigma=stats.sigma.numpy())
    ref = load_reference(str(path), 10)
    assert ref.stats.features is None and ref.stats.num is None
    result = compare(ref.stats, stats)
    assert abs(result["fid"]) < 1e-2 and result["kid"] is None and result["precision"] is None
    assert any("KID and precision/recall are not computed" in w for w in result["warnings"])


@pytest.fixture(scope="module")
def inception():
    return default_extractor()


def test_inception_features_real_images(inception, tmp_path):
    digits = build_dataset("digits", "test").images[:6]
    feats = inception(digits)
    assert feats.shape == (6, FEATURE_DIM) and torch.isfinite(feats).all()
    # Grey images are the same as their 3-channel copy; the set against itself has FID 0.
    assert_close(inception(digits.expand(-1, 3, -1, -1)), feats)
    stats = FeatureStats.from_features(feats)
    assert abs(frechet_distance(stats.mu, stats.sigma, stats.mu, stats.sigma)) < 1e-3
    animals = FeatureStats.from_features(inception(build_dataset("animal_mnist", "all").images[:6]))
    assert frechet_distance(stats.mu, stats.sigma, animals.mu, animals.sigma) > 50


def test_dataset_reference_is_cached_and_a_corrupt_cache_rebuilt(inception, tmp_path, caplog):
    first = dataset_reference("digits:test:4", 99, progress=False)
    assert not first.cached and first.source == "digits:test:4" and first.stats.num == 4
    second = dataset_reference("digits:test:4", 99, progress=False)
    assert second.cached and second.cache_file == first.cache_file
    assert_close(second.stats.features, first.stats.features)
    with open(first.cache_file, "wb") as fh:
        fh.write(b"truncated")
    third = dataset_reference("digits:test:4", 99, progress=False)
    assert not third.cached and "unreadable reference cache" in caplog.text
    assert_close(third.stats.features, first.stats.features)


def test_bf16_features_are_close_to_fp32_and_cached_apart(inception, tmp_path):
    digits = build_dataset("digits", "test").images[:4]
    bf16 = default_extractor("bf16")(digits)
    assert bf16.dtype == torch.float32
    assert (bf16 - inception(digits)).norm() / inception(digits).norm() < 0.1
    fp32_ref = dataset_reference("digits:test:4", 99, progress=False)
    bf16_ref = dataset_reference("digits:test:4", 99, progress=False, precision="bf16")
    assert bf16_ref.cache_file != fp32_ref.cache_file and bf16_ref.source.endswith("-bf16")
    assert_close(bf16_ref.stats.features, bf16)
    with pytest.raises(ValueError, match="feature precision 'fp16'"):
        InceptionFeatures(precision="fp16")


def test_heldout_loss_is_the_flow_mse_on_fixed_draws():
    cfg = ModelConfig(input_size=8, in_channels=1, patch_size=4, depth=2, hidden_size=16,
                      num_heads=2, num_classes=10, moe=MoEConfig(type="diffmoe", num_experts=2))
    torch.manual_seed(0)
    model = build_model(cfg).train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    digits = build_dataset("digits", "test")
    data = HeldOutSet.build(digits, 6, 3, seed=5)
    assert data.times.tolist() == pytest.approx([1 / 6, 0.5, 5 / 6])
    assert torch.equal(HeldOutSet.build(digits, 6, 3, seed=5).noise, data.noise)
    flow = FlowMatching(1)
    got = heldout_loss(model, flow, data, Routing("static"), batch_size=6)
    assert model.training  # restored
    model.eval()
    by_hand = []
    for k, t in enumerate(data.times.tolist()):
        tt = torch.full((6,), t)
        z = tt.view(-1, 1, 1, 1) * data.images + (1 - tt.view(-1, 1, 1, 1)) * data.noise[k]
        v = model(z, tt * 1000, data.labels, Routing("static")).prediction
        by_hand.append(float((v - (data.images - data.noise[k])).pow(2).mean()))
    assert got["per_t"] == pytest.approx(by_hand, rel=1e-5)
    assert got["loss"] == pytest.approx(sum(by_hand) / 3, rel=1e-5)
    with pytest.raises(DataError, match="held-out set needs"):
        HeldOutSet.build(digits, 0, 3)


def test_saved_statistics_round_trip(tmp_path):
    stats = FeatureStats.from_features(torch.randn(5, FEATURE_DIM))
    save_stats(stats, tmp_path / "s.npz", {"format": 1})
    ref = load_reference(str(tmp_path / "s.npz"), 10)
    assert ref.stats.num == 5
    assert_close(ref.stats.features, stats.features)
    assert_close(ref.stats.sigma, stats.sigma)


@pytest.fixture(scope="module")
def tiny_run(train_tiny):
    return train_tiny("sample.steps=2")


def test_eval_command_writes_metrics_capacity_and_settings(capsys, tiny_run, tmp_path):
    out, npz = tmp_path / "eval.json", tmp_path / "samples.npz"
    rc, stdout, err = run_cli(["eval", str(tiny_run), "--num", "6", "--batch-size", "3",
                               "--ref", "digits:test:5", "--out", str(out), "--save-npz",
                               str(npz), "--no-progress"], capsys)
    assert rc == 0, err
    result = json.loads(out.read_text())
    for key in ("fid", "kid", "kid_std", "precision", "recall"):
        assert np.isfinite(result[key]), key
    assert result["inception_score"] is None and "Inception Score" in result["notes"][0]
    assert result["settings"]["mode"] == "dynamic" and result["settings"]["batch_size"] == 3
    assert result["settings"]["num"] == 6 and result["reference"]["source"] == "digits:test:5"
    per_step = result["capacity_per_timestep"]
    # digits_tiny: depth 2 with MoE interleaved into the odd block, so one MoE layer.
    assert len(per_step) == 2 and len(result["capacity_per_layer"]) == 1
    assert result["c_avg_infer"] == pytest.approx(
        sum(p["capacity"] for p in per_step) / len(per_step), rel=1e-6)
    assert result["images_per_second"] > 0 and result["activated_params"] > 0
    assert np.load(npz)["arr_0"].shape == (6, 8, 8, 1)
    assert json.loads(stdout)["fid"] == result["fid"]
    # The results file is not replaced without --force.
    rc, _, err = run_cli(["eval", str(tiny_run), "--num", "6", "--ref", "digits:test:5",
                          "--out", str(out)], capsys)
    assert rc == 2 and "already exists" in error_line(err)


@pytest.mark.parametrize("args, fragment", [
    (["--num", "1"], "FID needs at least 2 samples"),
    (["--ref", "digits:test:1"], "needs at least 2 images"),
    (["--threshold", "2", "--mode", "threshold"], "must be in [0, 1]"),
    (["--feature-batch", "0"], "--feature-batch 0 must be a positive integer"),
])
def test_eval_argument_errors(capsys, tiny_run, tmp_path, args, fragment):
    rc, _, err = run_cli(["eval", str(tiny_run), "--out", str(tmp_path / "e.json"),
                          "--no-progress", *args], capsys)
    assert rc == 2 and fragment in error_line(err)


def test_eval_with_a_wrong_reference_file_is_one_line(capsys, tiny_run, tmp_path):
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(64), sigma=np.eye(64))
    rc, _, err = run_cli(["eval", str(tiny_run), "--num", "4", "--ref", str(ref),
                          "--out", str(tmp_path / "e.json"), "--no-progress"], capsys)
    assert rc == 2 and "'mu' has shape (64,), expected (2048,)" in error_line(err)


def test_dense_checkpoint_refuses_dynamic_eval_and_sweep(capsys, tmp_path, train_tiny):
    run = train_tiny("model.moe.type=dense")
    rc, _, err = run_cli(["eval", str(run), "--mode", "dynamic", "--num", "4",
                          "--out", str(tmp_path / "e.json")], capsys)
    assert rc == 2 and "needs a capacity predictor" in error_line(err)
    rc, _, err = run_cli(["sweep-thresholds", str(run), "--num", "4",
                          "--out", str(tmp_path / "sw")], capsys)
    assert rc == 2 and "needs a capacity predictor" in error_line(err)


def test_sweep_capacity_rises_as_the_threshold_falls(capsys, tiny_run, tmp_path):
    out = tmp_path / "sweep"
    rc, stdout, err = run_cli(["sweep-thresholds", str(tiny_run), "--num", "4",
                               "--thresholds", "0.99", "0.5", "0.0", "--ref", "digits:test:4",
                               "--budget", "1.0", "--out", str(out), "--no-progress"], capsys)
    assert rc == 0, err
    result = json.loads((out / "sweep.json").read_text())
    rows = [r for r in result["rows"] if r["mode"] == "threshold"]
    caps = [r["c_avg_infer"] for r in rows]
    assert caps == sorted(caps) and caps[-1] == pytest.approx(4.0)  # gamma 0: every token
    assert [r["mode"] for r in result["rows"]][-2:] == ["dynamic", "static"]
    best = result["best"]
    assert best is None or best["c_avg_infer"] <= 1.0
    assert Image.open(out / "sweep.png").size[0] > 100
    assert "best threshold" in stdout


def test_analyze_writes_the_four_plots(capsys, tiny_run, tmp_path):
    out = tmp_path / "analysis"
    rc, _, err = run_cli(["analyze", str(tiny_run), "--num", "6", "--batch-sizes", "1", "3",
                          "--num-per-batch-size", "3", "--cfg-scale", "2", "--out", str(out),
                          "--no-progress"], capsys)
    assert rc == 0, err
    result = json.loads((out / "analysis.json").read_text())
    for name, path in result["figures"].items():
        assert Image.open(path).format == "PNG", name
    assert [r["batch_size"] for r in result["capacity_vs_batch_size"]] == [1, 3]
    assert set(result["capacity_by_class"]) == {"0", "1", "2", "3", "4", "5", "uncond"}
    assert np.array(result["expert_load"]).shape == (1, 4)  # one MoE layer, 4 experts
    assert len(result["capacity_per_timestep"]) == 2


def test_capacity_meter_optional_records():
    meter = CapacityMeter(track_experts=True, track_samples=True)
    # token 0 taken by expert 0, token 1 by expert 1
    layer = FFNOutput(y=torch.zeros(2, 2, 1), tokens_T=torch.tensor([0, 1]),
                      counts_E=torch.tensor([1, 1]), num_tokens=4, base_experts=2)

    class Out:
        prediction = torch.zeros(2, 1)
        layers = [layer]

    meter.on_forward(0.5, Out())
    assert_close(meter.per_expert[0][0], torch.tensor([0.5, 0.5]))
    assert_close(meter.per_sample[0], torch.tensor([1.0, 0.0]))
    assert meter.c_avg() == pytest.approx(0.5)


def test_fid_command_between_two_sets(capsys):
    rc, stdout, err = run_cli(["fid", "digits:train:4", "digits:train:4", "--no-progress"],
                              capsys)
    assert rc == 0, err
    assert abs(json.loads(stdout)["fid"]) < 1e-3


def test_adm_image_reference_is_featurised_once(inception, tmp_path):
    images = build_dataset("digits", "test").images[:4]
    path = tmp_path / "ref_batch.npz"
    np.savez(path, arr_0=images.permute(0, 2, 3, 1).numpy())
    first = load_reference(str(path), 10, batch_size=2, progress=False)
    assert first.stats.num == 4 and not first.cached
    assert_close(first.stats.features, inception(images))
    second = load_reference(str(path), 10, progress=False)
    assert second.cached and second.cache_file == first.cache_file


@pytest.mark.slow
def test_eval_across_two_processes_equals_one_process(tiny_run, tmp_path):
    """FID across processes (torchrun, gloo): 3 sampling batches of 6 shared by 2 processes
    (one of them with nothing to do in the second round) give the single process's FID, KID,
    precision, recall, capacity and saved images exactly, for the same seeds, batch and
    threads per process (the Inception features' float sums depend on the thread count)."""
    import jobs

    common = ["eval", str(tiny_run), "--num", "18", "--batch-size", "6", "--device", "cpu",
              "--ref", "digits:test:18", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    load_reference("digits:test:18", 18, str(tmp_path / "cache"), 50, False)
    results = {}
    for nproc in (1, 2):
        out, npz = tmp_path / f"{nproc}.json", tmp_path / f"{nproc}.npz"
        # "--": torchrun's own parser would take --num for an abbreviation of --numa-binding.
        job = jobs.torchrun(["-m", "diffmoe", "--", *common, "--out", str(out), "--save-npz",
                             str(npz)], timeout_s=300, nproc=nproc)  # 1 thread each
        assert job.returncode == 0, job.stderr[-3000:]
        results[nproc] = json.loads(out.read_text()), npz
    (one, one_npz), (two, two_npz) = results[1], results[2]
    assert (one["settings"]["processes"], two["settings"]["processes"]) == (1, 2)
    for key in ("fid", "kid", "precision", "recall", "c_avg_infer", "capacity_per_layer",
                "capacity_per_timestep", "model_calls_per_batch"):
        assert one[key] == two[key], key
    # Bitwise: each batch is the same computation in either run (same shapes, seeds, threads),
    # gathered in batch order; only the process that runs it differs.
    with np.load(one_npz) as a, np.load(two_npz) as b:
        assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)


def test_eval_caches_its_reference_in_the_run_and_says_so(tiny_run, tmp_path, monkeypatch,
                                                          caplog):
    """Without --cache-dir or $DIFFMOE_CACHE_DIR, diffmoe eval keeps the reference it computes
    under the run (not in the home directory) and logs where before computing it."""
    monkeypatch.delenv("DIFFMOE_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    caplog.set_level(logging.INFO, logger="diffmoe")
    out = tmp_path / "eval.json"
    assert main(["eval", str(tiny_run), "--num", "4", "--steps", "1", "--batch-size", "4",
                 "--ref", "digits:test:4", "--out", str(out), "--no-progress"]) == 0
    cache_file = Path(json.loads(out.read_text())["reference"]["cache_file"])
    assert cache_file.parent == tiny_run / "cache" / "fid" and cache_file.is_file()
    assert not (tmp_path / "home").exists()
    assert any("to be cached at" in r.getMessage() and str(cache_file) in r.getMessage()
               for r in caplog.records)


def test_features_run_where_the_model_samples_and_only_rank_0_shows_progress(tiny_run,
                                                                            monkeypatch):
    """The Inception runs on the sampling device (the model's) in the feature precision the
    sampling settings give, a rank other than 0 draws no progress bar, and what a rank hands to
    the gather is features and capacity records, no images (without --save-npz)."""
    from diffmoe.evaluation import evaluate
    from diffmoe.evaluation.evaluate import EvalOptions, Evaluator

    evaluator = Evaluator.load(tiny_run, {"batch_size": 2}, EvalOptions(num=4, device="cpu"))
    seen = {"progress": [], "extractors": [], "parts": []}
    generate, extractor = evaluator.pipeline.batches, evaluate.default_extractor

    def spy_generate(*args, **kwargs):
        seen["progress"].append(kwargs["progress"])
        return generate(*args, **kwargs)

    def spy_extractor(precision, device):
        seen["extractors"].append((precision, torch.device(device)))
        return extractor(precision, device)

    def spy_gather(part):
        seen["parts"].append(part)
        return [part]

    monkeypatch.setattr(evaluator.pipeline, "batches", spy_generate)
    monkeypatch.setattr(evaluate, "default_extractor", spy_extractor)
    monkeypatch.setattr(evaluate.distributed, "gather_to_main", spy_gather)
    labels = torch.arange(4) % 10
    for rank in (0, 1):
        monkeypatch.setattr(evaluate.distributed, "process_share", lambda r=rank: (r, 2))
        feats, _, _ = evaluator._features(labels, evaluator.sample, CapacityMeter(), None,
                                          "fp32")
        assert feats.shape == (2, FEATURE_DIM)  # this rank's one batch of 2
    assert seen["progress"] == [True, False]
    assert seen["extractors"] == [("fp32", evaluator.device)] * 2
    sent = [p for p in seen["parts"] if p is not None]
    assert len(sent) == 2 and all(p["pixels"] is None and p["labels"] is None for p in sent)


def test_features_follow_the_sampling_precision_on_a_gpu_only():
    from diffmoe.evaluation.inception import feature_precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert feature_precision("bf16", cuda) == "bf16" and feature_precision("fp32", cuda) == "fp32"
    # The CPU keeps fp32 features, comparable with every earlier result.
    assert feature_precision("bf16", cpu) == "fp32"


def test_the_feature_precision_can_be_chosen_and_is_checked(tiny_run, monkeypatch):
    from diffmoe.errors import ConfigError
    from diffmoe.evaluation.evaluate import EvalOptions, Evaluator

    with pytest.raises(ConfigError, match="feature_precision='fp16' is not one of"):
        Evaluator.load(tiny_run, {}, EvalOptions(num=4, device="cpu", feature_precision="fp16"))
    evaluator = Evaluator.load(tiny_run, {"batch_size": 2},
                               EvalOptions(num=4, device="cpu", feature_precision="bf16"))
    asked = []

    class Stop(Exception):
        pass

    def load_reference(precision="fp32"):
        asked.append(precision)
        raise Stop

    monkeypatch.setattr(evaluator, "load_reference", load_reference)
    with pytest.raises(Stop):
        evaluator.run()
    assert asked == ["bf16"]  # not the CPU's default fp32
