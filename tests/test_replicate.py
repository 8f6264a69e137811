"""The machinery of benchmarks/replicate.py at a toy size (not the study): rows run in order with
what they need, write their results, are skipped when done, stop at the budget, reproduce their
numbers when rerun, and feed the report. A toy feature network stands in for the Inception so
that FID costs nothing here."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import replicate  # noqa: E402

PROJECTION = torch.randn(32 * 32, 6, generator=torch.Generator().manual_seed(0))


def toy_features(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 1, 32, 32) → (N, 6): a fixed random projection."""
    return pixels.float().flatten(1).div(255) @ PROJECTION


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    torch.set_num_threads(2)
    study = replicate.Study(replicate.TINY, tmp_path_factory.mktemp("study"),
                            extractor=toy_features)
    rows = replicate.selected(replicate.plan(replicate.TINY),
                              ["eval-diffmoe-e8-s0-predictor", "batch-*-predictor-*",
                               "stability-*"])
    assert replicate.run_plan(study, rows, budget_minutes=0) == 0
    return study, rows


def test_rows_run_with_what_they_need_in_plan_order(finished):
    study, rows = finished
    assert [r.id for r in rows] == ["train-diffmoe-e8-s0", "eval-diffmoe-e8-s0-predictor",
                                    "batch-diffmoe-e8-s0-predictor-b2",
                                    "stability-diffmoe-e8-s0"]
    for r in rows:
        assert study.row_path(r.id).is_file()
    train = json.loads(study.row_path("train-diffmoe-e8-s0").read_text())
    assert train["steps"] == replicate.TINY.steps and len(train["curve"]) == 1
    assert train["total_params"] > train["activated_params_c1"]
    ev = json.loads(study.row_path("eval-diffmoe-e8-s0-predictor").read_text())
    assert ev["mode"] == "predictor" and ev["num"] == replicate.TINY.fid_num
    for key in ("fid", "heldout_loss", "c_avg_infer", "class_consistency", "kid"):
        assert math.isfinite(ev[key]), key
    assert 0 <= ev["class_consistency"] <= 1 and 0 < ev["c_avg_infer"] <= 8
    assert (study.out / "grids" / "eval-diffmoe-e8-s0-predictor.png").is_file()


def test_predictor_rows_do_not_depend_on_the_sampling_batch(finished):
    study, _ = finished
    b4 = json.loads(study.row_path("eval-diffmoe-e8-s0-predictor").read_text())
    b2 = json.loads(study.row_path("batch-diffmoe-e8-s0-predictor-b2").read_text())
    assert (b4["batch"], b2["batch"]) == (4, 2)
    for key in ("fid", "c_avg_infer", "class_consistency"):
        assert b2[key] == pytest.approx(b4[key], rel=1e-5, abs=1e-6), key


def test_finished_rows_are_skipped_and_the_budget_stops_new_rows(finished, tmp_path):
    study, rows = finished
    stamps = {r.id: study.row_path(r.id).stat().st_mtime_ns for r in rows}
    assert replicate.run_plan(study, rows, budget_minutes=0) == 0
    assert stamps == {r.id: study.row_path(r.id).stat().st_mtime_ns for r in rows}
    fresh = replicate.Study(replicate.TINY, tmp_path / "fresh", extractor=toy_features)
    assert replicate.run_plan(fresh, rows, budget_minutes=1e-9) == len(rows)
    assert not (tmp_path / "fresh" / "rows").exists()


def test_a_row_claimed_by_another_process_is_left_to_it(finished, tmp_path):
    from diffmoe.paths import DirectoryLock

    _, rows = finished
    fresh = replicate.Study(replicate.TINY, tmp_path / "fresh", extractor=toy_features)
    (fresh.out / "claims").mkdir(parents=True)
    other = DirectoryLock(fresh.out / "claims" / "train-diffmoe-e8-s0.lock")
    other.acquire()  # another worker is training the model every other row needs
    try:
        assert not replicate.run_next(fresh, rows)
        assert not (fresh.out / "rows").exists()
    finally:
        other.release()


def test_a_rerun_row_reproduces_its_numbers(finished):
    study, rows = finished
    assert replicate.verify(study, rows, "eval-diffmoe-e8-s0-predictor")


def test_the_report_reads_the_rows(finished):
    study, rows = finished
    summary = replicate_report_of(study, rows)
    (line,) = summary["comparison"]
    assert (line["model"], line["mode"], line["seeds"]) == ("diffmoe-e8", "predictor", [0])
    assert line["fid"]["se"] is None  # one seed: no standard error
    assert [d["batch"] for d in summary["sampling_batch"]] == [2, 4]
    report = study.out / "report"
    for name in ("tables.md", "summary.json", "loss_curves.png", "sampling_batch.png",
                 "stability.png"):
        assert (report / name).is_file(), name
    changed = summary["stability"]["modes"]["dynamic"]["changed"]
    assert len(changed) == replicate.TINY.sample_steps - 1
    assert all(0 <= c <= 1 for step in changed for c in step)
    lines = summary["stability_summary"]
    layers = len(changed[0])
    assert len(lines) == len(summary["stability"]["modes"]) * layers
    dynamic_first = next(ln for ln in lines if (ln["mode"], ln["layer"]) == ("dynamic", 1))
    assert math.isclose(dynamic_first["changed"], sum(c[0] for c in changed) / len(changed))
    assert "## Routing stability" in (report / "tables.md").read_text()


def test_models_are_compared_seed_by_seed():
    from replicate_report import paired_models

    def result(fid, loss):
        return {"fid": fid, "heldout_loss": loss, "c_avg_infer": 1.0, "class_consistency": 0.5}

    done = {"eval-diffmoe-e8-s0-dynamic": result(10.0, 0.20),
            "eval-diffmoe-e8-s1-dynamic": result(12.0, 0.22),
            "eval-tc-e8-s0-static": result(13.0, 0.25),
            "eval-tc-e8-s1-static": result(14.0, 0.25),
            "eval-tc-e8-s2-static": result(99.0, 0.99)}  # no DiffMoE row for seed 2: unpaired
    rows = replicate.plan(replicate.FULL)
    (line,) = [ln for ln in paired_models(done, rows, replicate.MODELS)
               if "TC-MoE" in ln["modes"] and ln["model"].startswith("DiffMoE-E8")]
    assert line["seeds"] == 2
    assert line["fid"]["values"] == [-3.0, -2.0]
    assert math.isclose(line["fid"]["mean"], -2.5)
    assert math.isclose(line["fid"]["se"], 0.5)
    assert math.isclose(line["heldout_loss"]["mean"], -0.04)


def replicate_report_of(study, rows):
    from replicate_report import write_report

    return write_report(study.out, rows, study.scale, replicate.MODELS, {})


def test_every_row_of_the_full_study_has_a_unique_id_and_its_training_row_first():
    rows = replicate.plan(replicate.FULL)
    ids = [r.id for r in rows]
    assert len(ids) == len(set(ids))
    for i, r in enumerate(rows):
        if r.needs:
            assert r.needs in ids[:i], r.id
    assert sum(r.kind == "train" for r in rows) == len(replicate.MODELS) * 3


def test_a_study_folder_refuses_rows_of_another_scale(tmp_path):
    study = replicate.Study(replicate.TINY, tmp_path)
    replicate.check_scale(study)
    replicate.check_scale(study)  # the same scale again: continues
    edited = replicate.Study(replicate.replace(replicate.TINY, steps=5), tmp_path)
    with pytest.raises(SystemExit, match=r"holds rows of another scale \(differs in steps\)"):
        replicate.check_scale(edited)


def test_a_study_folder_refuses_an_edited_base_config(tmp_path, monkeypatch):
    replicate.check_scale(replicate.Study(replicate.TINY, tmp_path))
    edited = tmp_path / "base.yaml"
    edited.write_text(replicate.BASE_CONFIG.read_text().replace("num_experts: 4",
                                                                "num_experts: 2"))
    monkeypatch.setattr(replicate, "BASE_CONFIG", edited)
    with pytest.raises(SystemExit, match=r"differs in the models' configs"):
        replicate.check_scale(replicate.Study(replicate.TINY, tmp_path))


# -- the longer-horizon study (issue 37): checkpoints kept and evaluated along training -------

@pytest.fixture(scope="module")
def long_finished(tmp_path_factory):
    torch.set_num_threads(2)
    study = replicate.Study(replicate.TINY_LONG, tmp_path_factory.mktemp("long"),
                            extractor=toy_features)
    rows = replicate.plan(replicate.TINY_LONG)
    assert replicate.run_plan(study, rows, budget_minutes=0) == 0
    return study, rows


def test_the_long_study_samples_the_checkpoints_kept_along_training(long_finished):
    from diffmoe.hub import load_pretrained

    study, rows = long_finished
    assert [r.id for r in rows if r.model == "diffmoe-e8"] == [
        "train-diffmoe-e8-s0", "eval-diffmoe-e8-s0-dynamic-at2", "eval-diffmoe-e8-s0-static-at2",
        "eval-diffmoe-e8-s0-dynamic-at4", "eval-diffmoe-e8-s0-static-at4"]
    train = json.loads(study.row_path("train-diffmoe-e8-s0").read_text())
    assert [p["step"] for p in train["curve"]] == [2, 4]
    assert sorted(train["checkpoints"], key=int) == ["2", "4"]
    for step, path in train["checkpoints"].items():
        assert load_pretrained(path).step == int(step)
    early, last = (json.loads(study.row_path(f"eval-diffmoe-e8-s0-dynamic-at{s}").read_text())
                   for s in (2, 4))
    assert early["heldout_loss"] != last["heldout_loss"], "both rows sampled one checkpoint"


def test_verifying_a_row_at_a_kept_step_retrains_only_up_to_it(long_finished):
    study, rows = long_finished
    assert replicate.verify(study, rows, "eval-diffmoe-e8-s0-dynamic-at2")
    again = json.loads((study.out / "verify" / "rows" / "train-diffmoe-e8-s0.json").read_text())
    assert again["steps"] == 2 and sorted(again["checkpoints"]) == ["2"]
    tampered = study.row_path("eval-diffmoe-e8-s0-dynamic-at2")
    stored = json.loads(tampered.read_text())
    tampered.write_text(json.dumps({**stored, "fid": stored["fid"] + 1e-3}))
    try:
        assert not replicate.verify(study, rows, "eval-diffmoe-e8-s0-dynamic-at2")
    finally:
        tampered.write_text(json.dumps(stored))


def test_the_long_study_reports_its_differences_over_training(long_finished):
    from replicate_report import write_report

    study, rows = long_finished
    summary = write_report(study.out, rows, study.scale, replicate.MODELS, {})
    over = {(ln["pair"], ln["step"]): ln for ln in summary["over_training"]}
    assert set(over) == {(pair, step) for step in (2, 4) for pair in (
        "DiffMoE-E8 (dynamic) - Dense-1x (static)", "DiffMoE-E8: static - dynamic")}
    rows_at = {key: json.loads(study.row_path(f"eval-{key}-at4").read_text())
               for key in ("diffmoe-e8-s0-dynamic", "dense-1x-s0-static")}
    fid = over["DiffMoE-E8 (dynamic) - Dense-1x (static)", 4]["fid"]
    assert fid["values"] == [rows_at["diffmoe-e8-s0-dynamic"]["fid"]
                             - rows_at["dense-1x-s0-static"]["fid"]]
    (curve,) = summary["curve_differences"]
    assert curve["steps"] == [2, 4] and len(curve["loss"]) == 2
    assert {(ln["model"], ln["at"]) for ln in summary["comparison"]} == {
        (m, s) for m in ("dense-1x", "diffmoe-e8") for s in (2, 4)}
    tables = (study.out / "report" / "tables.md").read_text()
    assert "## Differences over training" in tables and "| Dense-1x | static | 4 |" in tables
    assert "## Interval search" not in tables, "a table the long study does not measure"
    assert (study.out / "report" / "over_training.png").is_file()


def test_the_long_study_plan():
    rows = replicate.plan(replicate.LONG)
    assert sum(r.kind == "train" for r in rows) == 4 * 3
    evals = [r for r in rows if r.kind == "eval"]
    assert len(evals) == 5 * 3 * 3 and {r.at for r in evals} == {2000, 5000, 10000}
    assert len({r.id for r in rows}) == len(rows)
    assert not any(r.kind in ("sweep", "batch", "stability") for r in rows)
    with pytest.raises(SystemExit, match="two studies"):
        replicate.main(["--quick", "--long", "--list"])
