"""The pipeline's arguments as diffusers' DiTPipeline takes them (issue 33), each against the
images ``diffmoe sample`` draws or the pipeline's own default call; its errors name the Python
argument; capacity warnings reach Python; loading a class model imports no transformers. The
``cuda`` test is for benchmarks/gpu_check (skipped without a CUDA device)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from diffmoe import DiffMoEPipeline
from diffmoe.cli import main as cli_main
from diffmoe.errors import CapacityWarning, DiffMoEError
from diffmoe.sample import batch_seed

LABELS = [0, 1, 2, 3]
STEPS = 2


@pytest.fixture(scope="module")
def run(train_tiny):
    return train_tiny()


@pytest.fixture(scope="module")
def pipe(run):
    return DiffMoEPipeline.from_pretrained(run, device="cpu")


def _call(pipe, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CapacityWarning)
        return pipe(**{"class_labels": LABELS, "num_inference_steps": STEPS, "generator": 5,
                       "progress": False, **kwargs})


def test_output_types_and_return_dict_hold_the_same_pixels(pipe):
    pil = _call(pipe).images
    as_np = _call(pipe, output_type="np").images
    as_pt = _call(pipe, output_type="pt").images
    (as_tuple,) = _call(pipe, output_type="pt", return_dict=False)
    assert as_np.shape == (4, 8, 8, 1) and as_np.dtype == np.float32
    assert torch.equal(as_tuple, as_pt)  # the same computation twice
    assert np.array_equal(as_np, as_pt.permute(0, 2, 3, 1).numpy())
    for image, array in zip(pil, as_np, strict=True):
        assert np.array_equal(np.array(image), np.round(array[..., 0] * 255).astype(np.uint8))


def test_latents_are_the_starting_noise(pipe):
    """The noise a seed draws for batch 0, passed as latents, gives the seed's images."""
    noise = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(batch_seed(5, 0)))
    seeded = _call(pipe, output_type="pt").images
    given = _call(pipe, output_type="pt", latents=noise, generator=None).images
    assert torch.equal(seeded, given)
    other = _call(pipe, output_type="pt", latents=torch.zeros(4, 1, 8, 8)).images
    assert not torch.equal(seeded, other)


def test_every_seed_draws_its_own_noise(pipe):
    """torch's CPU generator keeps a seed's low 32 bits only: batch seeds stay below 2**32 and
    apart, so seeds 0, 1 and 2 give three sets of images (when seed s's batch 0 was seeded with
    s·2**32 they all gave seed 0's), while a seed still gives its images again."""
    seeds = [batch_seed(s, b) for s in range(3) for b in range(1000)]
    assert len(set(seeds)) == len(seeds) and max(seeds) < 2**32
    assert [batch_seed(0, b) for b in range(3)] == [0, 1, 2]  # seed 0's images are unchanged
    images = [_call(pipe, output_type="pt", generator=s).images for s in (0, 1, 2, 1)]
    assert not torch.equal(images[0], images[1]) and not torch.equal(images[1], images[2])
    assert torch.equal(images[1], images[3])  # the same computation twice


def test_a_list_of_generators_makes_each_image_its_own(pipe):
    """Image 2 of a batch drawn with one generator per image is the image drawn alone from that
    generator (dynamic routing is per token, so the batch does not change it); in another batch
    shape, so to a tolerance far below the change of seed that the second check catches."""
    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    batch = _call(pipe, output_type="pt", generator=gens(10, 11, 12, 13), mode="dynamic").images
    alone = _call(pipe, class_labels=[2], output_type="pt", generator=gens(12),
                  mode="dynamic").images
    torch.testing.assert_close(batch[2:3], alone, atol=1e-5, rtol=0)
    moved = _call(pipe, class_labels=[2], output_type="pt", generator=gens(99),
                  mode="dynamic").images
    assert (moved - alone).abs().max() > 1e-2


def test_a_list_of_generators_makes_stochastic_steps_per_image_too(pipe):
    """The SDE sampler draws noise at every step: from each image's own generator."""
    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    sde = {"sampler": "sde", "mode": "dynamic", "output_type": "pt"}
    batch = _call(pipe, generator=gens(1, 2, 3, 4), **sde).images
    alone = _call(pipe, class_labels=[3], generator=gens(4), **sde).images
    torch.testing.assert_close(batch[3:4], alone, atol=1e-5, rtol=0)


def test_torch_dtype_bfloat16_samples_under_bf16(pipe, run):
    half = DiffMoEPipeline.from_pretrained(run, device="cpu", torch_dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    out = _call(half, output_type="pt")
    assert out.settings.precision == "bf16"
    # bf16 keeps 8 bits of mantissa: pixels within a few levels of the fp32 images.
    torch.testing.assert_close(out.images, _call(pipe, output_type="pt").images, atol=0.05,
                               rtol=0)


def test_progress_bar_counts_denoising_steps(pipe, capsys):
    _call(pipe, batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert "denoising steps" in err and f"{2 * STEPS}/{2 * STEPS}" in err


def test_capacity_warnings_reach_python_in_its_words(pipe):
    with pytest.warns(CapacityWarning, match="sampling batch size 1"):
        pipe(class_labels=[3], num_inference_steps=1, progress=False)
    with pytest.warns(CapacityWarning, match="every expert selected every token .* raise "
                                             "threshold$"):
        pipe(class_labels=LABELS, num_inference_steps=1, mode="threshold", threshold=0.0,
             progress=False)


def test_digit_models_know_their_class_names(pipe):
    assert pipe.id2label == {i: str(i) for i in range(10)}
    assert pipe.get_label_ids(["3", "7"]) == [3, 7] and pipe.labels["9"] == 9


@pytest.mark.parametrize("call, expected", [
    (dict(class_labels=["3"]), "class_labels takes class indices, not the name '3'; turn names "
                               "into indices with pipe.get_label_ids(['3'])"),
    (dict(class_labels=3.0), "class_labels must be an integer, a list of integers or an "
                             "integer tensor, got float"),
    (dict(class_labels=torch.tensor([1.0])), "class_labels must be integers"),
    (dict(num_inference_steps=2.7), "num_inference_steps must be an integer, got 2.7"),
    (dict(num_inference_steps=0), "num_inference_steps=0 must be a positive integer"),
    (dict(guidance_scale="2"), "guidance_scale must be a number, got '2'"),
    (dict(guidance_scale=float("nan")), "guidance_scale=nan must be finite"),
    (dict(guidance_scale=-1.0), "guidance_scale=-1.0 must be >= 0"),
    (dict(generator=2**70), "generator=1180591620717411303424 is more than"),
    (dict(generator=[torch.Generator()]), "generator is a list of 1 generators for 4 images"),
    (dict(generator=[0, 1, 2, 3]), "generator must be a seed (int), a torch.Generator or "
                                   "a list of one per image, got int"),
    (dict(threshold=0.3), "threshold does nothing here: it applies only with "
                          "mode='threshold'"),
    (dict(mode="fast"), "mode='fast' is not one of"),
    (dict(batch_size=8), "batch_size=8 is larger than the 4 images to draw"),
    (dict(latents=torch.zeros(3, 1, 8, 8)), "latents has shape (3, 1, 8, 8) but 4 images"),
    (dict(latents=torch.full((4, 1, 8, 8), float("nan"))), "latents holds NaN or inf"),
    (dict(return_dict="yes"), "return_dict must be True or False"),
    (dict(sample_settings={"steps": 3}), "sample_settings has 'steps', which is none of"),
])
def test_bad_arguments_are_one_line_naming_the_argument(pipe, call, expected):
    with pytest.raises(DiffMoEError, match=re.escape(expected)) as err:
        _call(pipe, **call)
    assert "\n" not in str(err.value) and "sample." not in str(err.value)
    assert "--" not in str(err.value)


def test_torch_dtype_and_label_names_are_checked(run, pipe):
    with pytest.raises(DiffMoEError, match="torch_dtype=torch.float16 is not one diffmoe "
                                           "samples in"):
        DiffMoEPipeline.from_pretrained(run, torch_dtype=torch.float16)
    with pytest.raises(DiffMoEError, match="'cats' is not a class of this model"):
        pipe.get_label_ids(["cats"])


def test_the_cli_speaks_its_options_and_logs_the_warnings(run, tmp_path, caplog, capsys):
    """diffmoe sample draws through the pipeline and words its messages as options."""
    png = tmp_path / "one.png"
    assert cli_main(["sample", str(run), "--num", "1", "--steps", "1", "--out", str(png),
                     "--device", "cpu"]) == 0
    assert any("sampling batch size 1" in r.getMessage() for r in caplog.records)
    assert json.loads(png.with_suffix(".json").read_text())["settings"]["num"] == 1
    capsys.readouterr()
    assert cli_main(["sample", str(run), "--num", "2", "--threshold", "0.3", "--out",
                     str(png), "--force"]) != 0
    assert "error: --threshold does nothing here: it applies only with --mode threshold" in \
        capsys.readouterr().err


def test_loading_a_class_model_imports_no_transformers_or_torchmetrics(run):
    code = ("import sys, diffmoe; diffmoe.DiffMoEPipeline.from_pretrained(sys.argv[1], "
            "device='cpu'); print(sorted(m for m in ('transformers', 'torchmetrics', "
            "'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr


@pytest.mark.cuda
def test_on_cuda_generators_and_bf16_as_on_the_cpu(run):
    """On a CUDA device (benchmarks/gpu_check runs this): one CUDA generator per image makes an
    image the same alone as in its batch, a CPU generator is refused in one line, and bf16
    weights sample close to fp32."""
    pipe = DiffMoEPipeline.from_pretrained(run, device="cuda")

    def gens(*seeds):
        return [torch.Generator(device="cuda").manual_seed(s) for s in seeds]

    batch = _call(pipe, output_type="pt", generator=gens(1, 2, 3, 4), mode="dynamic").images
    alone = _call(pipe, class_labels=[1], output_type="pt", generator=gens(2),
                  mode="dynamic").images
    torch.testing.assert_close(batch[1:2], alone, atol=5e-3, rtol=0)  # TF32 matmuls
    with pytest.raises(DiffMoEError, match="generator is on cpu but the model on cuda"):
        _call(pipe, generator=torch.Generator())
    half = DiffMoEPipeline.from_pretrained(run, device="cuda", torch_dtype=torch.bfloat16)
    torch.testing.assert_close(_call(half, output_type="pt").images,
                               _call(pipe, output_type="pt").images, atol=0.05, rtol=0)
