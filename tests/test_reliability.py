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
