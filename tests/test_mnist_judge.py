"""The MNIST judge: the committed weights read held-out digits, class consistency counts what it
should, bad input is refused, and the recipe is deterministic."""

from __future__ import annotations

import pytest
import torch

from diffmoe.data import build_dataset
from diffmoe.errors import DataError
from diffmoe.evaluation.mnist_judge import (
    JudgeRecipe,
    MnistJudge,
    class_consistency,
    judge_metadata,
    load_judge,
    train_judge,
)


@pytest.fixture(scope="module")
def test_split():
    data = build_dataset("mnist", "test")
    return data.images[:2000], data.labels[:2000]


def test_committed_judge_reads_held_out_digits(test_split):
    images, labels = test_split
    result = class_consistency(load_judge(), images, labels)
    assert result["class_consistency"] >= 0.98 and result["num"] == 2000
    assert set(result["per_class"]) == {str(c) for c in range(10)}
    # The accuracy the file records was measured on the whole test split with these weights.
    assert judge_metadata()["test_accuracy"] >= 0.99


def test_consistency_counts_the_label_asked_for(test_split):
    images, labels = test_split
    judge = load_judge()
    wrong = class_consistency(judge, images, (labels + 1) % 10)
    assert wrong["class_consistency"] <= 0.02
    # The same images as [-1, 1] floats (how samples come out of the sampler) read the same.
    floats = images.float().div(127.5).sub(1.0)  # the judge's own conversion: the same computation
    assert torch.equal(judge.classify(floats), judge.classify(images))
    blank = torch.zeros(10, 1, 32, 32, dtype=torch.uint8)
    assert class_consistency(judge, blank, torch.arange(10))["class_consistency"] <= 0.2


def test_bad_input_is_refused():
    judge = load_judge()
    with pytest.raises(DataError, match="reads \\(N, 1, 32, 32\\) images"):
        judge.classify(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(DataError, match="one label per image"):
        class_consistency(judge, torch.zeros(2, 1, 32, 32, dtype=torch.uint8),
                          torch.tensor([1]))


def test_the_recipe_is_deterministic():
    recipe = JudgeRecipe(epochs=1, limit=256, batch_size=64)
    a, b = (train_judge(recipe, progress=False).state_dict() for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], MnistJudge().state_dict()[k]) for k in a)


def test_sample_judge_reports_the_consistency_of_the_grid(train_tiny, tmp_path, capsys):
    """``diffmoe sample --judge`` on an MNIST-shaped model: the summary and the printed line
    carry the judge's reading of exactly the images drawn, for their labels."""
    import json

    from diffmoe import pipeline as sample_module  # diffmoe sample draws through it
    from diffmoe.cli import main

    run = train_tiny("data.name=mnist", "data.split=test", "data.limit=64", "model.input_size=32",
                     "model.patch_size=8")
    seen = {}
    real_generate = sample_module.generate

    def generate(*args, **kwargs):
        images, meter = real_generate(*args, **kwargs)
        seen["images"], seen["labels"] = images, args[2]
        return images, meter

    out = tmp_path / "grid.png"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sample_module, "generate", generate)
        assert main(["sample", str(run), "--judge", "--num", "20", "--steps", "1",
                     "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    judged = json.loads(out.with_suffix(".json").read_text())["judge"]
    expected = class_consistency(load_judge(), seen["images"], seen["labels"])
    assert seen["labels"].tolist() == [i % 10 for i in range(20)]
    assert judged["num"] == 20 and judged["per_class"] == expected["per_class"]
    assert printed["class_consistency"] == judged["class_consistency"] == \
        expected["class_consistency"]
    assert judged["judge_test_accuracy"] == judge_metadata()["test_accuracy"]
