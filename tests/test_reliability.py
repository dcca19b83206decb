"""Caching by content, the manifest and `verify`, and resuming after SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cli import main
from tests.conftest import (
    TINY_CONFIG,
    finished_tiny_run,
    tree_hashes,
    write_config,
    write_images,
    write_model_folder,
)

ROOT = Path(__file__).parent.parent
STAGES = "prune,finetune,samples,quality,export,report"


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    return finished_tiny_run(tmp_path_factory.mktemp("reliability"), STAGES)


@pytest.fixture
def small_run(base_run, tmp_path):
    """A private copy of the finished base run."""
    cfg, run_dir = base_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return cfg, copy


def _statuses(capsys) -> dict[str, str]:
    out = {}
    for line in capsys.readouterr().err.splitlines():
        if line.startswith("[") and ("] cached" in line or "] start" in line):
            stage = line[1 : line.index("]")]
            out[stage] = "cached" if "] cached" in line else line.split("start", 1)[1].strip()
    return out


def test_unchanged_rerun_skips_every_stage(small_run, capsys):
    cfg, run_dir = small_run
    capsys.readouterr()
    before = tree_hashes(run_dir)
    assert main([str(cfg), "--stages", STAGES, "--run-dir", str(run_dir)]) == 0
    assert set(_statuses(capsys).values()) == {"cached"}
    assert tree_hashes(run_dir) == before


def test_changed_threshold_reruns_prune_and_everything_after(small_run, capsys):
    cfg, run_dir = small_run
    capsys.readouterr()
    assert main([str(cfg), "prune.threshold=0.5", "--stages", STAGES, "--run-dir", str(run_dir)]) == 0
    status = _statuses(capsys)
    assert status["prune"] == "(its config changed (prune))"
    for stage in ("finetune", "samples", "quality", "export", "report"):
        assert status[stage] != "cached", stage
    # the finetune starts afresh: checkpoints of the previous pruned model are not resumed
    rec = json.loads((run_dir / "finetune" / "record.json").read_text())
    assert rec["metrics"]["resumed_from"] is None


def test_changed_finetune_config_keeps_prune_cached(small_run, capsys):
    cfg, run_dir = small_run
    capsys.readouterr()
    assert main([str(cfg), "finetune.lr=0.001", "--stages", STAGES, "--run-dir", str(run_dir)]) == 0
    status = _statuses(capsys)
    assert status["prune"] == "cached"
    assert status["finetune"] == "(its config changed (finetune))"
    assert status["export"] == "(input from finetune changed)"


def test_force_reruns_a_stage_and_its_dependents(small_run, capsys):
    cfg, run_dir = small_run
    capsys.readouterr()
    assert main([str(cfg), "--stages", STAGES, "--run-dir", str(run_dir), "--force", "finetune"]) == 0
    status = _statuses(capsys)
    assert status["prune"] == "cached"
    for stage in ("finetune", "samples", "quality", "export", "report"):
        assert status[stage] == "(forced with --force)", stage


def test_changed_output_is_detected_and_rebuilt(small_run, capsys):
    cfg, run_dir = small_run
    grid = run_dir / "samples" / "grid.png"
    grid.write_bytes(b"not a png")
    capsys.readouterr()
    assert main([str(cfg), "--stages", STAGES, "--run-dir", str(run_dir)]) == 0
    assert _statuses(capsys)["samples"] == "(its outputs are missing or changed)"
    assert grid.read_bytes()[:4] == b"\x89PNG"


def test_manifest_lists_every_artifact_and_verify_passes(small_run, capsys):
    _, run_dir = small_run
    manifest = json.loads((run_dir / "manifest.json").read_text())["artifacts"]
    assert "prune/model/unet.safetensors" in manifest and "export/pruned/unet.fp32.onnx" in manifest
    entry = manifest["export/pruned/unet.fp32.onnx"]
    assert entry["stage"] == "export" and len(entry["sha256"]) == 64 and entry["bytes"] > 0
    assert "torch" in entry["versions"] and "export" in entry["config"]
    assert main(["verify", str(run_dir)]) == 0


def test_verify_reports_missing_changed_and_extra(small_run, capsys):
    _, run_dir = small_run
    (run_dir / "samples" / "grid.png").unlink()
    with open(run_dir / "prune" / "model" / "unet.json", "a") as f:
        f.write(" ")
    (run_dir / "stray.txt").write_text("x")
    capsys.readouterr()
    assert main(["verify", str(run_dir)]) == 2
    out = capsys.readouterr().out
    assert "MISSING  samples/grid.png" in out
    assert "CHANGED  prune/model/unet.json" in out
    assert "EXTRA    stray.txt" in out


def test_tampered_onnx_is_refused_before_parsing(small_run, capsys):
    cfg, run_dir = small_run
    onnx_file = run_dir / "export" / "pruned" / "unet.fp32.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[-10] ^= 0xFF  # same size, different bytes
    onnx_file.write_bytes(bytes(data))
    before = tree_hashes(run_dir)
    from compressor.errors import ArtifactError
    from export.onnx_export import check_onnx

    with pytest.raises(ArtifactError, match="differs from .*manifest.json .*--force export"):
        check_onnx(onnx_file)
    assert (
        main(["sample", str(run_dir), "--backend", "onnxruntime", "--num-images", "1", "--steps", "1"]) == 2
    )
    assert "tampered or truncated" in capsys.readouterr().err
    assert tree_hashes(run_dir) == before


@pytest.mark.slow
def test_sigkill_during_finetune_then_rerun_resumes_and_matches(tmp_path):
    model = write_model_folder(tmp_path / "model")
    images = tmp_path / "images"
    write_images(images, 8)
    text = (
        TINY_CONFIG.format(model=model, data=images)
        .replace("steps: 4", "steps: 60")
        .replace("checkpoint_every: 2", "checkpoint_every: 10")
    )
    cfg = write_config(tmp_path / "kill.yaml", text)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pipeline.cli", str(cfg), "--stages", "prune,finetune"]
    ref = subprocess.run([*cmd, "--run-dir", str(tmp_path / "ref")], env=env, capture_output=True, check=True)
    assert ref.returncode == 0
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--run-dir", str(run_dir)], env=env, stderr=subprocess.DEVNULL)
    ckpts = run_dir / "finetune" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not list(ckpts.glob("*/step-*/trainer.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "finetune" / "record.json").exists()
    subprocess.run([*cmd, "--run-dir", str(run_dir)], env=env, capture_output=True, check=True)
    rec = json.loads((run_dir / "finetune" / "record.json").read_text())
    assert rec["metrics"]["resumed_from"] is not None and rec["metrics"]["resumed_from"] >= 10
    for name in ("model/unet.safetensors", "model-raw/unet.safetensors"):
        assert (run_dir / "finetune" / name).read_bytes() == (
            tmp_path / "ref" / "finetune" / name
        ).read_bytes()


# -- the gate trusts only what it can verify: record hashes, intervals, overrides --------------------

GATED = "prune,quality,check"
GATED_SETTINGS = [
    "prune.timestep_stride=500",
    "data.max_images=64",
    "quality.resamples=20",
    "quality.compare_raw=false",
    "acceptance.min_ssim=0.0",
    "acceptance.max_fd_ratio=100",
]


@pytest.fixture(scope="module")
def gated_base(tmp_path_factory):
    """A finished tiny run of prune, quality and check (digits, so the Frechet ratio has an interval)."""
    root = tmp_path_factory.mktemp("gated")
    model = write_model_folder(root / "model")
    cfg = write_config(root / "tiny.yaml", TINY_CONFIG.format(model=model, data="digits"))
    run_dir = root / "run"
    assert main([str(cfg), *GATED_SETTINGS, "--stages", GATED, "--run-dir", str(run_dir)]) == 0
    return cfg, run_dir


@pytest.fixture
def gated_run(gated_base, tmp_path):
    """A private copy of the finished gated run."""
    cfg, run_dir = gated_base
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return cfg, copy


def _quality_ratio_ci(run_dir: Path, value: list) -> None:
    """Edit the quality record as a user would: the compressed model's ``fd_ratio_ci``."""
    path = run_dir / "quality" / "record.json"
    rec = json.loads(path.read_text())
    label = next(k for k in ("student", "finetuned", "pruned") if k in rec["metrics"]["models"])
    rec["metrics"]["models"][label]["fd_ratio_ci"] = value
    path.write_text(json.dumps(rec, indent=1))


def _one_error(capsys) -> tuple[str, str]:
    captured = capsys.readouterr()
    err = [ln for ln in captured.err.strip().splitlines() if ln.startswith("error: ")]
    assert len(err) == 1 and "Traceback" not in captured.err, captured.err[-2000:]
    return err[0], captured.out


def test_an_ok_run_passes_and_its_manifest_holds_every_record_hash(gated_run, capsys):
    from rundir import records
    from rundir.artifacts import sha256_file

    _, run_dir = gated_run
    listed = json.loads((run_dir / "manifest.json").read_text())["records"]
    assert set(listed) == {f"{s}/record.json" for s in GATED.split(",")}
    for rel, entry in listed.items():
        assert entry["sha256"] == sha256_file(run_dir / rel), rel
    assert records.read_metrics(run_dir, "check").overrides == []  # the stage gates the run's own config
    before = tree_hashes(run_dir)
    capsys.readouterr()
    assert main(["check", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "acceptance: PASS" in out and "overridden" not in out
    assert main(["verify", str(run_dir)]) == 0
    assert tree_hashes(run_dir) == before


def test_check_names_an_overridden_limit_beside_the_verdict_and_writes_nothing(gated_run, capsys):
    from compressor.config import AcceptanceConfig
    from rundir.records import limit_overrides

    _, run_dir = gated_run
    before = tree_hashes(run_dir)
    capsys.readouterr()
    assert main(["check", str(run_dir), "acceptance.max_fd_ratio=50", "acceptance.min_ssim=0.0"]) == 0
    (verdict,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("acceptance: ")]
    overridden = "acceptance.max_fd_ratio overridden on the command line: 50.0 (the run's config: 100.0)"
    assert verdict == f"acceptance: PASS; {overridden}"  # min_ssim=0.0 is the run's own value: not named
    assert tree_hashes(run_dir) == before
    found = limit_overrides(run_dir, AcceptanceConfig(min_ssim=0.0, max_fd_ratio=1.6))
    assert found == [{"key": "acceptance.max_fd_ratio", "run": 100.0, "now": 1.6, "recorded": True}]


def test_an_edited_quality_record_is_refused_naming_the_file(gated_run, capsys):
    cfg, run_dir = gated_run
    _quality_ratio_ci(run_dir, [2.0, 1.0])
    before = tree_hashes(run_dir)
    capsys.readouterr()
    assert main(["check", str(run_dir)]) == 2
    line, out = _one_error(capsys)
    assert "quality/record.json differs from its sha256" in line and "--force quality" in line
    assert "acceptance:" not in out
    assert tree_hashes(run_dir) == before
    assert main(["verify", str(run_dir)]) == 2
    assert "CHANGED  quality/record.json" in capsys.readouterr().out
    # the check stage of the pipeline refuses it the same way
    assert main([str(cfg), *GATED_SETTINGS, "--stages", "check", "--run-dir", str(run_dir)]) == 2
    line, _ = _one_error(capsys)
    assert "quality/record.json differs from its sha256" in line


def test_a_reversed_interval_is_refused_even_where_the_hash_matches(gated_run, capsys):
    from rundir import records
    from rundir.artifacts import note_record
    from rundir.integrity import reversed_interval

    _, run_dir = gated_run
    _quality_ratio_ci(run_dir, [2.0, 1.0])
    note_record(run_dir, run_dir / "quality" / "record.json")  # as if a stage had written it so
    capsys.readouterr()
    assert main(["check", str(run_dir)]) == 2
    line, _ = _one_error(capsys)
    assert "quality/record.json: damaged record" in line and "fd_ratio_ci is [2, 1]" in line
    assert "low end is above its high end" in line and "--force quality" in line
    with pytest.raises(records.RecordError, match="fd_ratio_ci is"):
        records.read_metrics(run_dir, "quality")
    assert (
        reversed_interval({"a": [{"kid_ci": [0.5, 0.1]}], "b_ci": [1, 2]}, "m")
        == "m.a[0].kid_ci is [0.5, 0.1]"
    )
    assert reversed_interval({"x_ci": [float("nan"), 1.0], "y_ci": None, "z_ci": [3, 3]}, "m") is None


def test_a_changed_artifact_of_a_gated_record_is_refused(gated_run, capsys):
    _, run_dir = gated_run
    samples = run_dir / "quality" / "samples.safetensors"
    samples.write_bytes(samples.read_bytes()[:-8] + b"tampered")
    capsys.readouterr()
    assert main(["check", str(run_dir)]) == 2
    line, _ = _one_error(capsys)
    assert "quality/samples.safetensors, listed in" in line and "--force quality" in line


def test_a_record_the_manifest_does_not_list_is_refused_by_the_gate(gated_run, capsys):
    _, run_dir = gated_run
    path = run_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["records"]["quality/record.json"]
    path.write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["check", str(run_dir)]) == 2
    line, _ = _one_error(capsys)
    assert "quality/record.json is not listed in" in line and "--force quality" in line
    # a run written before record hashes cannot be verified: check says so and decides
    del manifest["records"]
    path.write_text(json.dumps(manifest))
    assert main(["check", str(run_dir)]) == 0
    captured = capsys.readouterr()
    assert "predates record hashes" in captured.err and "acceptance: PASS" in captured.out
