"""The speed-quality frontier of a text-to-image model (pipeline/frontier): every stack sampled with the
run's prompts under guidance and scored for prompt adherence beside the Frechet figures, the whole
call (text encoder, guided UNet loop, VAE decoder) timed on ONNX Runtime at two batches, and a latency
target over levers choosing a conditional stack."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from compressor.config import config_to_dict
from pipeline import frontier as fr
from pipeline.cli import main
from tests.conftest import conditional_config, text_to_image_folders

PROMPTS = ["a handwritten digit one", "a handwritten digit seven", "a handwritten digit three"]
FRONTIER = {"ratios": [0.0, 0.3], "schedulers": ["ddim"], "steps": [3, 2], "cache_intervals": [1],
            "precisions": ["fp32", "int8"], "samples": 6, "batch": 2, "batches": [1, 2], "repeat": 1,
            "warmup": 0, "threads": 1}  # fmt: skip


@pytest.fixture(scope="module")
def measured(tmp_path_factory, clip_tokenizer_folder) -> tuple[Path, Path, dict]:
    """A tiny text-to-image config and its frontier, measured once by the command with a 1.1x and an
    unreachable 1000x target: (config file, frontier folder, frontier.json)."""
    root = tmp_path_factory.mktemp("sd-frontier")
    pipe, data = text_to_image_folders(root, clip_tokenizer_folder, images=8)
    cfg = conditional_config(
        pipe, data, frontier=FRONTIER, sample={"prompts": PROMPTS},
        quality={"feature": "digits", "resamples": 20, "steps": 3},
        export={"precisions": ["fp32"], "calibration_images": 2, "calibration_steps": 2},
        acceptance={"min_adherence_ratio": 0.5},
    )  # fmt: skip
    path = root / "sd.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    out = root / "frontier"
    assert main(["frontier", str(path), "--target", "1.1x,1000x", "--out", str(out)]) == 0
    return path, out, json.loads((out / "frontier.json").read_text())


def test_every_conditional_stack_is_scored_with_adherence_and_timed_as_a_whole_call(measured):
    _, out, frontier = measured
    points = frontier["points"]
    assert len(points) == 2 * 2 * 2  # ratios x steps x precisions
    assert frontier["conditioning"] == "text" and frontier["guidance_scale"] == 3.0
    assert frontier["batches"] == [2, 1] and frontier["adherence_metric"] == "digits_accuracy"
    ref = frontier["reference"]
    assert 0 <= ref["adherence"] <= 1 and ref["adherence_ci"][0] <= ref["adherence"] <= ref["adherence_ci"][1]
    for p in points:  # the fraction of images showing their prompted digit, paired with dense's
        assert 0 <= p["adherence"] <= 1 and p["adherence_ci"][0] <= p["adherence"] <= p["adherence_ci"][1]
        if ref["adherence"] > 0:
            assert p["adherence_ratio"] == pytest.approx(p["adherence"] / ref["adherence"])
        assert set(p["by_batch"]) == {"1", "2"}
        for t in p["by_batch"].values():
            parts = t["components"]  # the whole call by component, the stack's and dense's
            assert set(parts) == {"text_encoder", "unet_loop", "vae_decoder"}
            assert sum(parts.values()) == pytest.approx(t["latency_ms"], rel=0.5)
            assert set(t["reference_components"]) == set(parts)
            assert t["speedup"] == pytest.approx(t["reference_ms"] / t["latency_ms"])
        assert p["speedup"] == p["by_batch"]["2"]["speedup"]  # speed-ups and targets read frontier.batch
    (dense,) = [p for p in points if p["stack"] == {**ref["stack"], "cache_interval": 1, "precision": "fp32"}]
    assert dense["ssim"] == pytest.approx(1.0) and dense["adherence"] == pytest.approx(ref["adherence"])
    int8 = [p for p in points if p["stack"]["precision"] == "int8"]
    assert int8 and all(p["ssim"] < 1.0 for p in int8)  # quantized: sampled through ONNX Runtime
    text = (out / "frontier.md").read_text()
    for part in ("the whole text-to-image call", "speed-up (batch 1)", "speed-up (batch 2)",
                 "| adherence | adherence ratio |", "Chosen for 1.1x", "Chosen for 1000x: none"):  # fmt: skip
        assert part in text, part


def test_a_latency_target_over_levers_chooses_a_conditional_stack(measured):
    _, _, frontier = measured
    chosen = frontier["chosen"]
    assert frontier["target"] == "1.1x" and frontier["choices"]["1000x"] is None
    if chosen is None:  # nothing measured 1.1x faster on a busy machine: the choice says so
        assert all(p["speedup"] < 1.1 * 1.03 for p in frontier["points"])
        return
    assert chosen["speedup"] >= 1.1 * 1.03 and chosen["adherence"] is not None
    gate = chosen["choice"]["quality_gate"]
    assert gate["min_adherence_ratio"] == 0.5
    passing = [p for p in frontier["points"] if p["speedup"] >= 1.1 * 1.03
               and fr.choice.passes_adherence(p, 0.5)]  # fmt: skip
    assert gate["meeting_target_and_passing"] == len(passing)
    if passing:
        assert chosen["key"] in {p["key"] for p in passing}


def test_a_rerun_of_the_conditional_frontier_measures_nothing_again(measured, capsys):
    path, out, frontier = measured
    stamps = {p: p.stat().st_mtime_ns for p in (out / "points").glob("*.json")}
    assert main(["frontier", str(path), "--target", "1.1x,1000x", "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "points").glob("*.json")} == stamps
    again = json.loads((out / "frontier.json").read_text())
    assert [p["adherence"] for p in again["points"]] == [p["adherence"] for p in frontier["points"]]
    # --retime: the timings again (a busy machine's), the quality kept
    assert main(["frontier", str(path), "--retime", "--out", str(out)]) == 0
    moved = {p.name for p in stamps if p.stat().st_mtime_ns != stamps[p]}
    assert moved == {p.name for p in stamps if ".latency." in p.name} and len(moved) == 2 * 8


def test_a_runs_latency_target_over_levers_chooses_from_the_conditional_frontier(measured, tmp_path):
    """``prune.target_latency.levers`` on a text-to-image config: the sweep around the run measures (here:
    reuses, ``frontier.dir``) the conditional frontier and hands the run a conditional stack."""
    from compressor.config import load_config
    from pipeline.frontier.target import choose_stack

    path, out, frontier = measured
    cfg = load_config(path, ["prune.ratio=null", "prune.target_latency.what=sampler",
                             "prune.target_latency.levers=[prune,steps,precision]",
                             "prune.target_latency.ms=100000", "prune.target_latency.batch=2",
                             "prune.target_latency.threads=1", f"frontier.dir={out}"])  # fmt: skip
    choice = choose_stack(cfg, tmp_path / "run")
    written = json.loads((tmp_path / "run" / "frontier" / "frontier.json").read_text())
    assert written["conditioning"] == "text" and written["chosen"]["stack"] == choice.stack.as_dict()
    assert choice.stack.as_dict() in [p["stack"] for p in frontier["points"]]  # nothing measured anew
    assert written["chosen"]["adherence"] is not None and "by_batch" in written["chosen"]


@pytest.fixture(scope="module")
def levers(tmp_path_factory, clip_tokenizer_folder) -> dict:
    """The dense text-to-image model's frontier over feature reuse (interval 2) and a 2-step student
    (guidance 3 distilled at 8 steps, then 8 -> 4 -> 2), the reference DDIM 8: frontier.json."""
    root = tmp_path_factory.mktemp("sd-levers")
    pipe, data = text_to_image_folders(root, clip_tokenizer_folder, images=8)
    grid = {**FRONTIER, "ratios": [0.0], "steps": [4], "cache_intervals": [1, 2], "precisions": ["fp32"],
            "students": [0, 2]}  # fmt: skip
    cfg = conditional_config(
        pipe, data, frontier=grid, sample={"prompts": PROMPTS, "steps": 8},
        quality={"feature": "digits", "resamples": 20}, export={"precisions": ["fp32"]},
        distill_steps={"start_steps": 8, "steps_per_round": 2, "batch_size": 4, "checkpoint_every": 2},
    )  # fmt: skip
    path = root / "sd.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    out = root / "frontier"
    assert main(["frontier", str(path), "--out", str(out)]) == 0
    return json.loads((out / "frontier.json").read_text())


def test_feature_reuse_and_a_guided_student_are_levers_of_the_whole_call(levers):
    points = {(p["stack"]["cache_interval"], p["stack"].get("student_steps", 0)): p for p in levers["points"]}
    assert set(points) == {(1, 0), (2, 0), (1, 2)}
    reuse, student = points[(2, 0)], points[(1, 2)]
    assert reuse["stack"]["steps"] == 4 and reuse["label"].endswith("cache 2")
    assert reuse["fd"] != points[(1, 0)]["fd"]  # the shallow passes change the images
    assert student["stack"]["steps"] == 2 and student["student_training"]["optimizer_steps"] > 0
    for p in (reuse, student):  # scored with the prompts, timed as whole calls at both batches
        assert p["adherence"] is not None and 0 < p["ssim"] < 1
        assert set(p["by_batch"]) == {"1", "2"}
        for t in p["by_batch"].values():
            assert set(t["components"]) == {"text_encoder", "unet_loop", "vae_decoder"}
            assert t["latency_ms"] > 0 and t["speedup"] > 0
