"""The edge bundle: solver loops against diffusers, same images as `sample`, refusals, a bare venv."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor.errors import UserError
from compressor.sampling import initial_noise, make_scheduler, seed_noise
from deploy.bundle_runtime.core import SOLVERS
from deploy.bundle_runtime.core import seed_noise as runtime_seed_noise
from deploy.edge_bundle import BundleSpec, make_bundle, scheduler_tables
from pipeline.cli import main
from tests.conftest import DDPM_SCHEDULER, finished_tiny_run

ROOT = Path(__file__).resolve().parent.parent
CLIPPED = {**DDPM_SCHEDULER, "clip_sample": True}


@pytest.mark.parametrize("kind", ["ddim", "dpmsolver++"])
@pytest.mark.parametrize("steps", [1, 2, 10, 25])
def test_the_runtime_solvers_follow_diffusers(kind, steps):
    settings, tables = scheduler_tables(kind, CLIPPED, steps)
    ours = SOLVERS[kind](settings, tables)
    theirs = make_scheduler(kind, CLIPPED)
    theirs.set_timesteps(steps)
    assert [int(t) for t in theirs.timesteps] == tables["timesteps"].tolist()
    x = runtime_seed_noise((2, 3, 8, 8), 7)
    xt = torch.from_numpy(x.copy())
    weight = np.linspace(-0.5, 0.9, 3 * 8 * 8, dtype=np.float32).reshape(3, 8, 8)
    for i, t in enumerate(theirs.timesteps):
        eps = (0.8 * x + weight * np.float32(int(t) / 1000)).astype(np.float32)  # a model of sorts
        eps_t = (0.8 * xt + torch.from_numpy(weight) * (int(t) / 1000)).float()
        x = ours.step(i, eps, x)
        xt = theirs.step(eps_t, t, xt).prev_sample
        assert np.abs(x - xt.numpy()).max() <= 1e-5, (kind, steps, i)


def test_the_noise_source_is_numpy_and_batch_independent():
    a = initial_noise((3, 4, 4), [5, 6]).numpy()
    assert np.array_equal(a[1], seed_noise((3, 4, 4), 6)) and np.array_equal(
        a[1], runtime_seed_noise((3, 4, 4), 6)
    )
    assert np.array_equal(a[0], initial_noise((3, 4, 4), [5]).numpy()[0])


def test_unsupported_samplers_are_refused():
    for kind in ("ddpm", "unipc"):
        with pytest.raises(UserError, match="deterministic solvers ddim, dpmsolver"):
            scheduler_tables(kind, DDPM_SCHEDULER, 10)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle-run")
    cfg, run = finished_tiny_run(root, "prune")
    overrides = ["export.feature_reuse=true", "export.precisions=[fp32]"]
    assert main([str(cfg), *overrides, "--stages", "export", "--run-dir", str(run)]) == 0
    return run


def _runtime(folder: Path, *args: str, python: str = sys.executable) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [python, "-m", "bundle_runtime", *args],
        cwd=folder,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


@pytest.mark.parametrize("scheduler, interval", [("ddim", 1), ("dpmsolver++", 2)])
def test_a_bundle_gives_the_images_of_sample_and_passes_its_check(exported, tmp_path, scheduler, interval):
    out = tmp_path / "bundle"
    spec = BundleSpec(scheduler=scheduler, steps=4, cache_interval=interval, batch=2)
    manifest = make_bundle(exported, out, spec, archive=True)
    assert (tmp_path / "bundle.tar.gz").stat().st_size > 0
    parts = {"full", "shallow"} if interval > 1 else {"unet"}
    assert set(manifest["graphs"]["model"]) == parts and set(manifest["graphs"]["dense"]) == parts
    done = _runtime(out, "generate", "--seed", "3", "--num-images", "3", "--out", str(tmp_path / "b.npy"))
    assert done.returncode == 0, done.stderr
    argv = ["sample", str(exported), "--backend", "onnxruntime", "--scheduler", scheduler, "--steps", "4",
            "--seed", "3", "--num-images", "3", "--cache-interval", str(interval)]  # fmt: skip
    argv += ["--out", str(tmp_path / "s.npy")]
    assert main(argv) == 0
    ours, theirs = np.load(tmp_path / "b.npy"), np.load(tmp_path / "s.npy")
    assert ours.shape == theirs.shape == (3, 3, 16, 16) and np.abs(ours - theirs).max() <= 1e-5
    record = tmp_path / "check.json"
    done = _runtime(out, "check", "--repeat", "3", "--sampler-repeat", "1", "--record", str(record))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [ln for ln in done.stdout.splitlines() if ln.split(" ")[0] in ("PASS", "FAIL", "INFO")]
    assert len(lines) == 6 and all(not ln.startswith("FAIL") for ln in lines), done.stdout
    facts = json.loads(record.read_text())
    assert facts["passed"] and facts["unet_ms"] > 0 and facts["batch"] == 2
    info = _runtime(out, "info")
    assert info.returncode == 0 and "scheduler.npz" in info.stdout and scheduler in info.stdout


def test_a_failed_gate_exits_3_and_bad_bundles_and_arguments_exit_2(exported, tmp_path):
    out = tmp_path / "bundle"
    make_bundle(exported, out, BundleSpec(steps=2), {"max_unet_ms": 1e-6})
    done = _runtime(
        out, "check", "--repeat", "3", "--sampler-repeat", "1", "--record", str(tmp_path / "r.json")
    )
    assert done.returncode == 3 and "FAIL unet latency" in done.stdout
    assert _runtime(out, "generate", "--out", str(tmp_path / "x.gif")).returncode == 2
    assert _runtime(out, "generate", "--num-images", "0").returncode == 2
    assert _runtime(out, "no-such-command").returncode == 2
    graph = out / "graphs" / "model" / "unet.fp32.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    done = _runtime(out, "generate")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: {graph} does not match its sha256 in manifest.json; the bundle was altered"
    ]
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    (out / "scheduler.npz").unlink()
    done = _runtime(out, "check")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {out / 'scheduler.npz'} is missing; the bundle is incomplete (copy it again)"
    ]
    with pytest.raises(Exception, match="exists; choose a new folder"):
        make_bundle(exported, out, BundleSpec(steps=2))


def test_the_bundle_check_decides_quality_gates_by_their_interval(exported, tmp_path):
    """The build host's quality gates travel in acceptance.json; the device re-decides them: a whole
    interval on the good side passes, one straddling the limit is inconclusive (exit 4), one on the
    bad side fails (exit 3, before inconclusive)."""

    def gate(name, interval, limit, direction):
        facts = {"samples": 256, "level": 0.95, "sampler": "ddim 50 steps"}
        return {"name": name, "measured": sum(interval) / 2, "interval": interval, "limit": limit,
                "direction": direction, **facts}  # fmt: skip

    ok, unsure = gate("min_ssim", [0.93, 0.95], 0.9, ">="), gate("max_fd_ratio", [0.9, 1.7], 1.5, "<=")
    bad = gate("max_fd_ratio", [1.6, 1.9], 1.5, "<=")
    codes = {}
    for label, gates in (("pass", [ok]), ("inconclusive", [ok, unsure]), ("fail", [bad, unsure])):
        out = tmp_path / label
        make_bundle(exported, out, BundleSpec(steps=2), {"quality": gates})
        record = tmp_path / f"{label}.json"
        done = _runtime(out, "check", "--repeat", "2", "--sampler-repeat", "1", "--record", str(record))
        codes[label] = done.returncode
        assert json.loads(record.read_text())["verdict"] == label, done.stdout
        if label == "inconclusive":
            (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("INCONCLUSIVE max_fd_ratio")]
            assert "95% interval [0.9, 1.7] <= 1.5" in line and "inconclusive" in line
            assert "this bundle samples ddim 2" in line  # the gate was measured with another sampler
    assert codes == {"pass": 0, "inconclusive": 4, "fail": 3}


def test_each_precision_is_gated_by_its_own_parity_tolerance(exported, tmp_path):
    from deploy.edge_bundle import _limits

    fp32 = _limits(exported, BundleSpec(precision="fp32"), {})
    fp16 = _limits(exported, BundleSpec(precision="fp16"), {})
    int8 = _limits(exported, BundleSpec(precision="int8"), {})
    assert fp32["max_unet_error"] == 1e-4 and fp16["max_unet_error"] == 2e-2
    assert int8["parity_statistic"] == "median" and int8["max_unet_error"] == 0.05


def test_a_bundle_refuses_an_onnxruntime_without_its_provider_unless_told(exported, tmp_path):
    out = tmp_path / "bundle"
    make_bundle(exported, out, BundleSpec(steps=2, provider="CUDAExecutionProvider", with_dense=False))
    done = _runtime(out, "generate", "--out", str(tmp_path / "a.png"))
    assert (
        done.returncode == 2 and "has no CUDAExecutionProvider" in done.stderr and "--fallback" in done.stderr
    )
    done = _runtime(out, "--fallback", "generate", "--num-images", "2", "--out", str(tmp_path / "a.png"))
    assert done.returncode == 0 and (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_the_demo_bundle_runs_in_a_venv_with_only_numpy_and_onnxruntime(exported, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    pip = subprocess.run([python, "-m", "pip", "install", "-q", "numpy", "onnxruntime"], capture_output=True,
                         text=True, timeout=900)  # fmt: skip
    assert pip.returncode == 0, pip.stderr[-2000:]
    for name in ("torch", "diffusers", "compressor"):
        probe = subprocess.run([python, "-c", f"import {name}"], capture_output=True, text=True, cwd=tmp_path)
        assert probe.returncode != 0, f"{name} is importable in the bare venv"
    out = tmp_path / "bundle"
    make_bundle(exported, out, BundleSpec(scheduler="dpmsolver++", steps=4, batch=2))
    done = _runtime(
        out, "generate", "--seed", "0", "--num-images", "2", "--out", str(tmp_path / "b.npy"), python=python
    )
    assert done.returncode == 0, done.stderr
    argv = ["sample", str(exported), "--backend", "onnxruntime", "--scheduler", "dpmsolver++", "--steps", "4",
            "--num-images", "2", "--out", str(tmp_path / "s.npy")]  # fmt: skip
    assert main(argv) == 0
    assert np.abs(np.load(tmp_path / "b.npy") - np.load(tmp_path / "s.npy")).max() <= 1e-5
    record = str(tmp_path / "r.json")
    done = _runtime(out, "check", "--repeat", "3", "--sampler-repeat", "1", "--record", record, python=python)
    assert done.returncode == 0, done.stdout + done.stderr


def test_engine_bundles_carry_the_runs_engines_and_refuse_runs_without_them(exported, tmp_path, capsys):
    from tests.conftest import placeholder_engines

    argv = ["bundle", str(exported), str(tmp_path / "none"), "--engine", "--steps", "2"]
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unet.engine not found" in err[0] and "compress-deploy build" in err[0]
    assert not (tmp_path / "none").exists()
    written = placeholder_engines(exported, precision="fp16")
    try:
        with pytest.raises(UserError, match="is a fp16 engine; bundle with --precision fp16"):
            make_bundle(exported, tmp_path / "wrong", BundleSpec(steps=2, engine=True))
        for path in written:  # now as a fp32 build
            if path.suffix == ".json":
                path.write_text(path.read_text().replace('"fp16"', '"fp32"'))
        with pytest.raises(UserError, match="--batch 32 is outside unet.engine's profile 1..16"):
            make_bundle(exported, tmp_path / "wide", BundleSpec(steps=2, batch=32, engine=True))
        out = tmp_path / "bundle"
        manifest = make_bundle(exported, out, BundleSpec(steps=2, engine=True))
    finally:
        for path in written:
            path.unlink()
    assert manifest["engines"] == {"model": {"unet": "engines/model/unet.engine"},
                                   "dense": {"unet": "engines/dense/unet.engine"}}  # fmt: skip
    assert {"engines/model/unet.engine", "engines/model/unet.engine.json"} <= set(manifest["files"])
    assert manifest["engine"]["tensorrt_version"] == "10.13.3.9" and "cuda-python" in manifest["requires"]
    # this host has no TensorRT: the engines' backend is refused in one line, or fallen back from
    done = _runtime(out, "info")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: TensorRT is not installed; the bundle's engines need `pip install tensorrt cuda-python` "
        "(or pass --backend onnxruntime)"
    ]
    done = _runtime(out, "--fallback", "info")
    assert done.returncode == 0 and "running on: onnxruntime (CPUExecutionProvider)" in done.stdout
    assert "fell back: TensorRT is not installed" in done.stdout
    done = _runtime(
        out, "--backend", "onnxruntime", "generate", "--num-images", "1", "--out", str(tmp_path / "a.npy")
    )
    assert done.returncode == 0 and np.load(tmp_path / "a.npy").shape == (1, 3, 16, 16)
    plain = tmp_path / "plain"
    make_bundle(exported, plain, BundleSpec(steps=2, with_dense=False))
    done = _runtime(plain, "--backend", "tensorrt", "info")
    assert done.returncode == 2 and "has no TensorRT engines" in done.stderr


def test_the_engine_runtime_uses_cuda_python_as_it_is():
    """Every cuda-python call of the bundle's TensorRT runtime exists with that many parameters."""
    import ast
    import re

    runtime = pytest.importorskip(
        "cuda.bindings.runtime", reason="cuda-bindings (a dev extra) is not installed"
    )
    from deploy.bundle_runtime import engines
    from deploy.bundle_runtime.core import BundleError

    tree = ast.parse(Path(engines.__file__).read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "_call"]
    used = {c.args[1].value: len(c.args) - 2 for c in calls}
    assert {"cudaMalloc", "cudaMemcpyAsync", "cudaStreamSynchronize", "cudaGetDeviceProperties"} <= set(used)
    for name, count in used.items():
        signature = getattr(runtime, name).__doc__.splitlines()[0]
        params = [p for p in re.search(r"\((.*)\)", signature).group(1).split(",") if p.strip()]
        assert len(params) == count, f"{name}: the runtime passes {count}, cuda-python takes {signature}"
    for name in ("cudaFree", "cudaStreamDestroy"):
        assert hasattr(runtime, name)
    assert runtime.cudaMemcpyKind.cudaMemcpyHostToDevice and runtime.cudaMemcpyKind.cudaMemcpyDeviceToHost
    assert {"name", "major", "minor"} <= set(dir(runtime.cudaDeviceProp()))
    if runtime.cudaGetDevice()[0] != runtime.cudaError_t.cudaSuccess:  # no GPU here: one clear line
        with pytest.raises(BundleError, match=r"^CUDA cudaGetDevice failed: cudaError\w+; is a CUDA GPU"):
            engines.device_identity(runtime)
