"""End to end on a tiny model: every stage, the report, the check command and sampling from a run."""

from __future__ import annotations

import json

import pytest

from pipeline.cli import main
from tests.conftest import tensorrt_reason, write_config

E2E = """
seed: 0
device: cpu
model:
  name: {model}
  init: pretrained
data:
  source: digits
  max_images: 64
prune:
  method: diff-pruning
  ratio: 0.25
  timestep_stride: 100
  batch_size: 4
finetune:
  steps: 4
  batch_size: 4
  checkpoint_every: 2
  log_every: 1
sample:
  steps: 3
  num_images: 4
quality:
  num_samples: 8
export:
  precisions: [fp32, fp16]
parity:
  batches: [1, 2]
  timesteps: [0, 999]
  sampler_images: 2
  sampler_steps: 3
  min_psnr_fp16: 20
bench:
  backends: [torch, onnxruntime, tensorrt]
  batch_sizes: [1, 2]
  sampler_steps: 2
  warmup: 1
  repeat: 2
  sampler_repeat: 1
acceptance:
  backend: onnxruntime
  batch: 2
  max_parity_error: 1.0e-4
  min_ssim: 0.0
  min_speedup: 0.01
"""


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from tests.conftest import write_model_folder

    root = tmp_path_factory.mktemp("e2e")
    model = write_model_folder(root / "model")
    cfg = write_config(root / "e2e.yaml", E2E.format(model=model))
    run_dir = root / "run"
    assert main([str(cfg), "--run-dir", str(run_dir)]) == 0
    return cfg, run_dir


@pytest.mark.slow
def test_every_stage_writes_its_record(finished_run):
    _, run_dir = finished_run
    for stage in (
        "prune",
        "finetune",
        "samples",
        "quality",
        "export",
        "parity",
        "build",
        "bench",
        "check",
        "report",
    ):
        rec = json.loads((run_dir / stage / "record.json").read_text())
        assert rec["stage"] == stage
        usable = stage != "build" or not tensorrt_reason()
        assert rec["status"] == ("ok" if usable else "skipped"), (stage, rec["reason"])
    build = json.loads((run_dir / "build" / "record.json").read_text())
    assert build["reason"] == tensorrt_reason()


@pytest.mark.slow
def test_parity_and_bench_records_follow_the_contract(finished_run):
    _, run_dir = finished_run
    parity = json.loads((run_dir / "parity" / "record.json").read_text())["metrics"]
    assert parity["max_abs_error_fp32"] < 1e-4
    assert parity["max_abs_error"] >= parity["max_abs_error_fp32"]
    assert {(r["model"], r["precision"]) for r in parity["results"]} == {
        ("dense", "fp32"),
        ("dense", "fp16"),
        ("pruned", "fp32"),
        ("pruned", "fp16"),
    }
    bench = json.loads((run_dir / "bench" / "record.json").read_text())["metrics"]
    rows = bench["results"]
    expected = {"torch", "onnxruntime"} | (set() if tensorrt_reason() else {"tensorrt", "tensorrt+cudagraph"})
    assert {r["backend"] for r in rows} >= expected
    assert {r["what"] for r in rows} == {"unet", "sampler"}
    assert {r["model"] for r in rows} == {"dense", "pruned"}
    for r in rows:
        assert set(r) >= {"backend", "batch", "model", "what", "median_ms", "p95_ms"}
        assert 0 < r["median_ms"] <= r["p95_ms"]
    assert all("macs_reduction" in s and s["speedup"] > 0 for s in bench["speedup"])
    assert bench["skipped"].get("tensorrt") == (tensorrt_reason() or None)
    quality = json.loads((run_dir / "quality" / "record.json").read_text())["metrics"]
    assert quality["frechet_metric"] == "fd_digits"
    assert 0 <= quality["models"]["finetuned"]["ssim_vs_dense"] <= 1
    assert quality["num_samples"] == 8
    # every figure with its interval (paired over the seeds), KID beside the Frechet distance
    for label, figures in quality["models"].items():
        assert {"fd_digits", "fd_digits_ci", "kid", "kid_std", "kid_ci"} <= set(figures), label
        low, high = figures["fd_digits_ci"]
        assert low <= figures["fd_digits"] <= high and figures["kid_ci"][0] <= figures["kid"]
    finetuned = quality["models"]["finetuned"]
    for key in ("fd_ratio", "ssim_vs_dense"):
        low, high = finetuned[f"{key}_ci"]
        assert low <= finetuned[key] <= high
    dense_fd = quality["models"]["dense"]["fd_digits"]
    assert finetuned["fd_ratio"] == pytest.approx(finetuned["fd_digits"] / dense_fd)
    assert quality["interval"]["level"] == 0.95 and quality["interval"]["method"] == "jackknife"
    assert quality["interval"]["resamples"] == 8  # delete-one: one replicate per seed
    low, high = quality["fd_digits_real_floor_ci"]
    assert low <= quality["fd_digits_real_floor"] <= high


@pytest.mark.slow
def test_report_is_written_and_self_contained(finished_run):
    _, run_dir = finished_run
    page = (run_dir / "report" / "report.html").read_text()
    md = (run_dir / "report" / "report.md").read_text()
    assert "data:image/png;base64," in page and "src='http" not in page
    for heading in ("Size", "Quality", "Parity", "Latency", "Acceptance checks"):
        assert f"## {heading}" in md and f"<h2>{heading}" in page
    assert "Acceptance: PASS" in md


@pytest.mark.slow
def test_check_command_passes_then_fails_when_tightened(finished_run, capsys):
    _, run_dir = finished_run
    assert main(["check", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "PASS  max_parity_error" in out and "acceptance: PASS" in out
    assert main(["check", str(run_dir), "acceptance.min_speedup=1000"]) == 3
    out = capsys.readouterr().out
    assert "FAIL  min_speedup" in out and "acceptance: FAIL (min_speedup)" in out
    # quality gates from their intervals: a limit inside the FD-infinity difference's interval
    # is inconclusive
    figs = json.loads((run_dir / "quality" / "record.json").read_text())["metrics"]["models"]["finetuned"]
    low, high = figs["fd_inf_diff_ci"]
    inside = low + 0.75 * (high - low)
    assert main(["check", str(run_dir), f"acceptance.max_fd_increase={inside}"]) == 4
    out = capsys.readouterr().out
    (line,) = [ln for ln in out.splitlines() if "max_fd_increase" in ln and "acceptance:" not in ln]
    assert line.startswith("INCONCLUSIVE  max_fd_increase") and "inconclusive" in line
    assert f"[{low:.4g}, {high:.4g}]" in line and "8 samples" in line and "would likely decide it" in line
    assert "quality.num_samples=auto" in line and "FD-infinity, compressed - dense" in line
    assert "acceptance: INCONCLUSIVE (max_fd_increase)" in out
    assert main(["check", str(run_dir), f"acceptance.max_fd_increase={high + 0.01 * abs(high)}"]) == 0
    assert "PASS  max_fd_increase" in capsys.readouterr().out
    # (a limit below the interval fails: tests/test_fd_infinity.py; 8 samples put its low end below 0)
    # a failed gate wins over an inconclusive one
    argv = ["check", str(run_dir), f"acceptance.max_fd_increase={inside}", "acceptance.min_speedup=1000"]
    assert main(argv) == 3
    capsys.readouterr()


@pytest.mark.slow
def test_an_inconclusive_gate_ends_the_run_with_exit_4_and_the_bundle_carries_it(finished_run, tmp_path):
    from pipeline.commands.bundle import quality_gates

    cfg_path, run_dir = finished_run
    figs = json.loads((run_dir / "quality" / "record.json").read_text())["metrics"]["models"]["finetuned"]
    low, high = figs["fd_inf_diff_ci"]
    inside = f"acceptance.max_fd_increase={(low + high) / 2 + (high - low) / 4}"
    assert main([str(cfg_path), inside, "--stages", "check", "--run-dir", str(run_dir)]) == 4
    record = json.loads((run_dir / "check" / "record.json").read_text())
    assert record["status"] == "inconclusive" and record["metrics"]["verdict"] == "inconclusive"
    assert record["metrics"]["inconclusive"] == ["max_fd_increase"] and not record["metrics"]["passed"]
    (gate,) = [g for g in quality_gates(run_dir) if g["name"] == "max_fd_increase"]
    assert gate["interval"] == [low, high] and gate["samples"] == 8
    assert main([str(cfg_path), "--stages", "check", "--run-dir", str(run_dir)]) == 0  # the config's limits


@pytest.mark.slow
def test_quality_may_leave_the_unfinetuned_model_out(finished_run, tmp_path):
    import shutil

    cfg_path, run_dir = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    argv = [str(cfg_path), "quality.compare_pruned=false", "--stages", "quality", "--run-dir", str(copy)]
    assert main(argv) == 0
    models = json.loads((copy / "quality" / "record.json").read_text())["metrics"]["models"]
    before = json.loads((run_dir / "quality" / "record.json").read_text())["metrics"]["models"]
    assert "pruned" in before and set(models) == set(before) - {"pruned"}
    assert models["finetuned"]["fd_ratio"] == pytest.approx(before["finetuned"]["fd_ratio"])  # same seeds


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_sample_command_from_a_finished_run(finished_run, backend, tmp_path):
    _, run_dir = finished_run
    out = tmp_path / f"{backend}.png"
    args = [
        "sample",
        str(run_dir),
        "--backend",
        backend,
        "--num-images",
        "2",
        "--steps",
        "2",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    assert out.is_file()


@pytest.mark.slow
def test_sampler_api_matches_across_backends(finished_run):
    from compressor.image_quality import psnr
    from deploy.sampler import load_sampler

    _, run_dir = finished_run
    a = load_sampler(run_dir, "torch")(num_images=2, steps=3, seed=5)
    b = load_sampler(run_dir, "onnxruntime")(num_images=2, steps=3, seed=5)
    assert a.shape == b.shape and psnr(a, b) > 50


@pytest.mark.slow
def test_run_level_bad_inputs(finished_run, capsys, tmp_path):
    from tests.conftest import tree_hashes

    cfg, run_dir = finished_run
    before = tree_hashes(run_dir)
    cases = [
        (["sample", str(run_dir), "--backend", "openvino"], "--backend: expected one of 'torch'"),
        (["check", str(tmp_path / "nowhere")], "not found"),
        (
            [str(cfg), "parity.atol_fp32=-1", "--run-dir", str(run_dir)],
            "parity.atol_fp32: expected a number >= 0.0",
        ),
        *([(["build", str(run_dir)], tensorrt_reason())] if tensorrt_reason() else []),
        (
            ["build", str(run_dir), "build.min_batch=8", "build.max_batch=4"],
            "min_batch <= opt_batch <= max_batch",
        ),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and "Traceback" not in "\n".join(err), argv
    assert tree_hashes(run_dir) == before


@pytest.mark.slow
def test_tampered_onnx_is_refused_by_the_stages_that_read_it(finished_run, capsys, tmp_path):
    import shutil

    cfg, run_dir = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    onnx_file = copy / "export" / "pruned" / "unet.fp32.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:1000])
    assert main([str(cfg), "--stages", "bench", "--run-dir", str(copy)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(onnx_file) in line and "tampered or truncated" in line and "--force export" in line


@pytest.mark.slow
def test_auto_sampling_stops_when_the_gates_decide_and_keeps_every_look(finished_run, tmp_path):
    import shutil

    cfg_path, run_dir = finished_run
    auto = ["quality.num_samples=auto", "quality.chunk_samples=8", "quality.max_samples=16"]
    looks = {}
    for name, limit in (("clear", 1.0e6), ("close", None)):
        copy = tmp_path / name
        shutil.copytree(run_dir, copy)
        if limit is None:  # a limit inside the first look's interval: the run samples on
            figs = json.loads((run_dir / "quality" / "record.json").read_text())["metrics"]["models"]
            low, high = figs["finetuned"]["fd_inf_diff_ci"]
            limit = (low + high) / 2
        argv = [str(cfg_path), *auto, f"acceptance.max_fd_increase={limit}", "--stages", "quality"]
        assert main([*argv, "--run-dir", str(copy), "--force", "quality"]) == 0
        metrics = json.loads((copy / "quality" / "record.json").read_text())["metrics"]
        looks[name] = metrics["looks"]
        assert metrics["sequential"]["boundary"] == "pocock" and metrics["sequential"]["planned_looks"] == [
            8,
            16,
        ]
        assert metrics["num_samples"] == looks[name][-1]["samples"]
        for look in looks[name]:
            assert {"samples", "models", "gates", "outcome"} <= set(look)
            assert "fd_inf_diff_ci" in look["models"]["finetuned"]
    assert [look["samples"] for look in looks["clear"]] == [8]
    outcome = {k: {g["name"]: g["outcome"] for g in looks[k][0]["gates"]} for k in looks}
    assert outcome["clear"]["max_fd_increase"] == "pass"
    assert [look["samples"] for look in looks["close"]] == [8, 16]
    assert outcome["close"]["max_fd_increase"] == "inconclusive"
    # the first look of both runs saw the same images: its figures are the same
    first = [looks[k][0]["models"]["finetuned"]["fd_inf_diff"] for k in ("clear", "close")]
    assert first[0] == pytest.approx(first[1])
