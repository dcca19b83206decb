"""Real faults: a second writer, a killed holder, disk full, signals, and the layers' import rules."""

from __future__ import annotations

import ast
import errno
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
from rundir import layout
from tests.conftest import TINY_CONFIG, tree_hashes, write_config, write_images, write_model_folder

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _tiny(tmp: Path, steps: int = 4, every: int = 2) -> Path:
    model = write_model_folder(tmp / "model")
    write_images(tmp / "images", 8)
    text = TINY_CONFIG.format(model=model, data=tmp / "images")
    text = text.replace("steps: 4", f"steps: {steps}").replace(
        "checkpoint_every: 2", f"checkpoint_every: {every}"
    )
    return write_config(tmp / "tiny.yaml", text)


def _temporaries(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob("*") if layout.is_temporary(p)]


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


HOLDER = """
import sys, time
from pathlib import Path
from pipeline.runlock import RunLock
lock = RunLock(Path(sys.argv[1]), "compress-deploy holder")
lock.acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_writer_is_refused_and_a_killed_holders_lock_is_taken_over(tmp_path, capsys):
    cfg = _tiny(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir)], env=ENV, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = tree_hashes(run_dir)
        capsys.readouterr()
        assert main([str(cfg), "--stages", "prune", "--run-dir", str(run_dir)]) == 2
        err = _errors(capsys.readouterr().err)
        assert len(err) == 1 and f"is in use by pid {holder.pid}" in err[0]
        assert "wait for it or pass another --run-dir" in err[0]
        assert main(["build", str(run_dir)]) == 2  # build writes into the run too
        assert f"in use by pid {holder.pid}" in _errors(capsys.readouterr().err)[0]
        assert tree_hashes(run_dir) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert layout.lock_path(run_dir).is_file()  # a killed holder leaves its file behind
    assert main([str(cfg), "--stages", "prune", "--run-dir", str(run_dir)]) == 0
    err = capsys.readouterr().err
    assert f"taking over the lock of {run_dir} left by pid {holder.pid}" in err
    assert not layout.lock_path(run_dir).exists()  # released on exit


def test_overrides_may_come_after_the_flags(tmp_path):
    cfg = _tiny(tmp_path)
    run_dir = tmp_path / "run"
    argv = [str(cfg), "--stages", "prune", "prune.ratio=0.5", "--run-dir", str(run_dir), "seed=3"]
    assert main(argv) == 0
    rec = json.loads(layout.record_path(run_dir, "prune").read_text())
    assert rec["metrics"]["ratio"] == 0.5 and rec["config"]["seed"] == 3


def test_disk_full_mid_stage_is_one_line_leaves_no_temporaries_and_resumes(tmp_path, monkeypatch, capsys):
    """ENOSPC while the finetune stage writes a checkpoint (a write wrapper; see also the tmpfs test)."""
    import safetensors.torch as training  # compressor.training imports save_file at each checkpoint

    cfg = _tiny(tmp_path, steps=6, every=2)
    run_dir = tmp_path / "run"
    real = training.save_file
    calls = {"n": 0}

    def full_disk(tensors, filename, *a, **k):
        calls["n"] += "checkpoints" in str(filename)
        if calls["n"] == 5:  # the second checkpoint (3 files each), half written
            Path(filename).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(training, "save_file", full_disk)
    capsys.readouterr()
    assert main([str(cfg), "--stages", "prune,finetune", "--run-dir", str(run_dir)]) == 2
    err = _errors(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error: finetune stage: cannot write ")
    assert "No space left on device; free some space or pass another --run-dir" in err[0]
    assert err[0].endswith("then rerun the same command to resume")
    assert _temporaries(run_dir) == [] and not layout.lock_path(run_dir).exists()
    assert main(["verify", str(run_dir)]) == 0  # the prune stage's outputs and the manifest are intact
    monkeypatch.setattr(training, "save_file", real)
    assert main([str(cfg), "--stages", "prune,finetune", "--run-dir", str(run_dir)]) == 0
    rec = json.loads(layout.record_path(run_dir, "finetune").read_text())
    assert rec["metrics"]["resumed_from"] == 2  # from the last complete checkpoint


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return done.returncode == 0


def test_disk_full_on_a_real_tmpfs(tmp_path, capsys):
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "1200k"):
        pytest.skip("cannot mount a tmpfs here (needs root and mount permission)")
    try:
        cfg = _tiny(tmp_path, steps=6, every=2)
        run_dir = small / "run"
        capsys.readouterr()
        code = main([str(cfg), "--stages", "prune,finetune,export", "--run-dir", str(run_dir)])
        err = _errors(capsys.readouterr().err)
        assert code == 2 and len(err) == 1, err
        assert "No space left on device" in err[0] and "rerun the same command to resume" in err[0]
        assert _temporaries(run_dir) == [] and not layout.lock_path(run_dir).exists()
        assert main(["verify", str(run_dir)]) == 0
        moved = tmp_path / "moved"
        shutil.copytree(run_dir, moved)
    finally:
        subprocess.run(["umount", str(small)], check=False)
    assert main([str(cfg), "--stages", "prune,finetune,export", "--run-dir", str(moved)]) == 0
    assert main(["verify", str(moved)]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_finetune_names_the_stage_cleans_up_and_resumes(tmp_path, sig, code):
    cfg = _tiny(tmp_path, steps=60, every=10)
    cmd = [sys.executable, "-m", "pipeline.cli", str(cfg), "--stages", "prune,finetune"]
    subprocess.run([*cmd, "--run-dir", str(tmp_path / "ref")], env=ENV, capture_output=True, check=True)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([*cmd, "--run-dir", str(run_dir)], env=ENV, stderr=subprocess.PIPE, text=True)
    ckpts = layout.checkpoints_dir(run_dir)
    deadline = time.time() + 120
    while time.time() < deadline and not list(ckpts.glob("*/step-*/trainer.json")):
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    name = signal.Signals(sig).name
    assert err.strip().splitlines()[-1] == (
        f"interrupted by {name} during the finetune stage; rerun the same command to resume"
    )
    assert "Traceback" not in err
    assert _temporaries(run_dir) == [] and not layout.lock_path(run_dir).exists()
    subprocess.run([*cmd, "--run-dir", str(run_dir)], env=ENV, capture_output=True, check=True)
    rec = json.loads(layout.record_path(run_dir, "finetune").read_text())
    assert rec["metrics"]["resumed_from"] is not None
    for name in ("model/unet.safetensors", "model-raw/unet.safetensors"):
        assert (run_dir / "finetune" / name).read_bytes() == (
            tmp_path / "ref" / "finetune" / name
        ).read_bytes()


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_layers_and_the_run_layout_have_one_owner():
    for floor, forbidden in (
        ("compressor", ("export", "deploy", "pipeline")),
        ("rundir", ("export", "deploy", "pipeline", "torch", "safetensors", "diffusers")),
        ("export", ("deploy", "pipeline")),
    ):
        for path in (ROOT / floor).rglob("*.py"):
            bad = [m for m in _imports(path) if m.split(".")[0] in forbidden]
            assert not bad, (path, bad)
    for path in (ROOT / "deploy").rglob("*.py"):
        assert not [m for m in _imports(path) if m.startswith("pipeline")], path
    # the run directory's package reads no model files: of compressor it imports the lowest modules only
    for path in (ROOT / "rundir").rglob("*.py"):
        mine = [m for m in _imports(path) if m.startswith("compressor")]
        assert set(mine) <= {"compressor.errors", "compressor.stack", "compressor.digest"}, (path, mine)
    # stages never import a stage or a command; commands never import a stage
    for path in (ROOT / "pipeline" / "stages").glob("*.py"):
        if path.name != "__init__.py":
            bad = [
                m
                for m in _imports(path)
                if m.startswith(("pipeline.stages", "pipeline.commands", "pipeline.cli"))
            ]
            assert not bad, (path, bad)
    for path in (ROOT / "pipeline" / "commands").glob("*.py"):
        bad = [m for m in _imports(path) if m.startswith(("pipeline.stages", "pipeline.cli"))]
        assert not bad, (path, bad)
    # paths inside a run (and a model folder) are joined only by compressor/layout.py
    hand_made = (
        '/ "record.json"', '/ "export" /', '/ "build" /', '/ "model"', '"model-raw"', '"unet.plan"',
        '"unet.engine"', '"unet.json"', '"unet.safetensors"', '"probe.safetensors"', '"checkpoints"',
        '"trainer.json"', '"run.json"', '"manifest.json"', '/ "ablation"', '/ "diffusers"', '/ "plan"',
    )  # fmt: skip
    for folder in ("compressor", "rundir", "export", "pipeline", "deploy"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "layout.py" or "bundle_runtime" in path.parts:
                continue  # the bundle runtime names its own folder's files (it imports numpy only)
            text = path.read_text()
            assert not [h for h in hand_made if h in text], (path, [h for h in hand_made if h in text])
    # records are parsed only by rundir/records.py (and the cache's own bookkeeping reads none)
    for folder in ("compressor", "rundir", "export", "pipeline", "deploy"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name != "records.py":
                text = path.read_text()
                assert '["metrics"]' not in text and "['metrics']" not in text, path
                users = ("layout.py", "context.py", "runner.py", "parity.py")  # name or write the file
                assert "record_path(" not in text or path.name in users, path


def test_backends_are_built_by_one_registry():
    """Only deploy/runtimes.py turns a backend name into a backend; the lists of names agree."""
    import typing

    from compressor.config import (
        BACKENDS as CONFIG_BACKENDS,
    )
    from compressor.config import (
        AcceptanceConfig,
        BenchConfig,
        LatencyTarget,
        QualityConfig,
        ServeConfig,
    )
    from deploy import runtimes

    assert runtimes.BACKENDS == tuple(runtimes.LOADERS) == CONFIG_BACKENDS
    hints = {
        cls: typing.get_type_hints(cls) for cls in (LatencyTarget, QualityConfig, ServeConfig, BenchConfig)
    }
    for cls, field in ((LatencyTarget, "backend"), (QualityConfig, "backend"), (ServeConfig, "backend")):
        assert typing.get_args(hints[cls][field]) == runtimes.BACKENDS, (cls, field)
    assert typing.get_args(typing.get_args(hints[BenchConfig]["backends"])[0]) == runtimes.BACKENDS
    variants = typing.get_args(typing.get_type_hints(AcceptanceConfig)["backend"])
    assert set(variants) == set(runtimes.VARIANTS)
    assert {name for name, _ in runtimes.VARIANTS.values()} == set(runtimes.BACKENDS)
    builders = ("onnxruntime_backend(", "torch_backend(", "EngineRunner(")
    for folder in ("pipeline", "deploy"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name in ("runtimes.py", "tensorrt_backend.py"):
                continue
            text = path.read_text()
            assert not [b for b in builders if b in text], path
