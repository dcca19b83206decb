"""Engine info, compatibility, profiles, the TensorRT module without TensorRT, acceptance, bench."""

from __future__ import annotations

import hashlib
import importlib
import json

import pytest

from compressor.config import AcceptanceConfig, config_from_mapping
from compressor.errors import ArtifactError, ConfigError, UserError
from deploy.engine_info import (
    Profile,
    check_compatible,
    check_integrity,
    profile_of,
    read_engine_info,
    write_engine_info,
)
from deploy.stopwatch import percentile_ms, time_alternating
from pipeline.acceptance import evaluate
from rundir.records import BenchMetrics, ParityMetrics, QualityMetrics

MANIFEST = {
    "tensorrt_version": "10.13.0",
    "gpu_name": "NVIDIA H100 80GB HBM3",
    "compute_capability": "9.0",
    "engine_sha256": "",
    "profile": {"min_batch": 1, "opt_batch": 8, "max_batch": 16},
    "precision": "fp16",
}


def _engine(tmp_path, data=b"engine-bytes"):
    engine = tmp_path / "unet.engine"
    engine.write_bytes(data)
    write_engine_info(engine, {**MANIFEST, "engine_sha256": hashlib.sha256(data).hexdigest()})
    return engine


def test_profile_validation():
    Profile(1, 8, 16).validate()
    with pytest.raises(ConfigError, match="min_batch <= opt_batch <= max_batch"):
        Profile(8, 4, 16).validate()
    with pytest.raises(ConfigError):
        Profile(0, 1, 1).validate()


def test_profile_in_config_rejects_min_above_max():
    message = "build: need 1 <= min_batch <= opt_batch <= max_batch, got 32/8/16; fix build.min_batch"
    with pytest.raises(ConfigError, match=message):
        config_from_mapping({"build": {"min_batch": 32, "opt_batch": 8, "max_batch": 16}})


def test_batch_outside_the_profile_is_a_clear_error(tmp_path):
    profile = Profile(1, 8, 16)
    profile.check_batch(16, tmp_path / "e.plan")
    with pytest.raises(UserError, match="batch 32 is outside the profile .* \\(1..16\\)"):
        profile.check_batch(32, tmp_path / "e.plan")


def test_profile_shapes_cover_every_input():
    shapes = Profile(1, 4, 8).shapes({"sample": (3, 32, 32), "timestep": (), "feature": (64, 16, 16)})
    assert shapes["sample"] == ((1, 3, 32, 32), (4, 3, 32, 32), (8, 3, 32, 32))
    assert shapes["timestep"] == ((1,), (4,), (8,))
    assert shapes["feature"] == ((1, 64, 16, 16), (4, 64, 16, 16), (8, 64, 16, 16))


def test_manifest_round_trip_and_checks(tmp_path):
    engine = _engine(tmp_path)
    manifest = read_engine_info(engine)
    assert profile_of(manifest) == Profile(1, 8, 16)
    check_integrity(manifest, engine, hashlib.sha256(engine.read_bytes()).hexdigest())
    check_compatible(manifest, engine, "10.13.0", "NVIDIA H100 80GB HBM3", "9.0")


def test_engine_from_another_tensorrt_version_is_refused(tmp_path):
    engine = _engine(tmp_path)
    with pytest.raises(
        ArtifactError, match="built with TensorRT 10.13.0, this is TensorRT 11.0.0.*compress-deploy build"
    ):
        check_compatible(read_engine_info(engine), engine, "11.0.0", "NVIDIA H100 80GB HBM3", "9.0")


def test_engine_for_another_gpu_architecture_is_refused(tmp_path):
    engine = _engine(tmp_path)
    with pytest.raises(ArtifactError, match="compute capability 9.0.*this is NVIDIA L4 \\(8.9\\)"):
        check_compatible(read_engine_info(engine), engine, "10.13.0", "NVIDIA L4", "8.9")


def test_corrupted_engine_is_refused(tmp_path):
    engine = _engine(tmp_path)
    engine.write_bytes(b"engine-by")  # truncated
    manifest = read_engine_info(engine)
    with pytest.raises(ArtifactError, match="does not match its engine info"):
        check_integrity(manifest, engine, hashlib.sha256(engine.read_bytes()).hexdigest())


def test_engine_without_manifest_is_refused(tmp_path):
    engine = tmp_path / "unet.engine"
    engine.write_bytes(b"x")
    with pytest.raises(ArtifactError, match="has no engine info"):
        read_engine_info(engine)
    (tmp_path / "unet.engine.json").write_text(json.dumps({"tensorrt_version": "10"}))
    with pytest.raises(ArtifactError, match="engine info lacks"):
        read_engine_info(engine)


def test_tensorrt_module_imports_and_says_why_it_cannot_run():
    module = importlib.import_module("deploy.tensorrt_backend")
    reason = module.unavailable_reason()
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert reason.startswith("TensorRT is not installed") and "Docker" in reason
    if reason:
        assert "\n" not in reason
        with pytest.raises(UserError, match="TensorRT"):
            module.require_tensorrt()
    else:
        assert module.require_tensorrt().__version__


def test_time_alternating_interleaves_calls():
    order = []
    times = time_alternating(
        {"a": lambda: order.append("a"), "b": lambda: order.append("b")}, warmup=1, repeat=3
    )
    assert order == ["a", "b"] + ["a", "b"] * 3
    assert len(times["a"]) == len(times["b"]) == 3
    med, p95 = percentile_ms([0.001, 0.002, 0.003])
    assert med == pytest.approx(2.0) and p95 >= med


def _records(speedup=2.0, err=1e-6, ssim=0.95, fd=(10.0, 12.0)):
    d = {
        "bench": {
            "metrics": {
                "results": [
                    {
                        "backend": "onnxruntime",
                        "batch": 4,
                        "what": "unet",
                        "model": "pruned",
                        "median_ms": 10.0,
                    },
                    {
                        "backend": "onnxruntime",
                        "batch": 4,
                        "what": "sampler",
                        "model": "pruned",
                        "median_ms": 400.0,
                    },
                ],
                "speedup": [
                    {"backend": "onnxruntime", "batch": 4, "what": "unet", "speedup": speedup},
                    {"backend": "onnxruntime", "batch": 4, "what": "sampler", "speedup": speedup * 0.9},
                ],
            }
        },
        "parity": {"metrics": {"max_abs_error_fp32": err}},
        "quality": {
            "metrics": {
                "frechet_metric": "fd_digits",
                "models": {
                    "dense": {"fd_digits": fd[0]},
                    "finetuned": {"fd_digits": fd[1], "ssim_vs_dense": ssim},
                },
            }
        },
    }

    return (
        BenchMetrics(**d["bench"]["metrics"]),
        ParityMetrics(results=[], **d["parity"]["metrics"]),
        QualityMetrics(num_samples=4, steps=10, scheduler="ddim", **d["quality"]["metrics"]),
    )


def test_acceptance_checks_pass_and_fail_on_limits():
    cfg = AcceptanceConfig(
        backend="onnxruntime",
        batch=4,
        max_unet_ms=20,
        max_image_ms=150,
        min_speedup=1.5,
        min_sampler_speedup=1.5,
        max_parity_error=1e-4,
        min_ssim=0.9,
        max_fd_ratio=1.5,
    )
    checks = {c.name: c for c in evaluate(cfg, *_records())}
    assert all(c.passed for c in checks.values()), [c.line() for c in checks.values()]
    assert checks["max_image_ms"].measured == pytest.approx(100.0)
    assert checks["max_fd_ratio"].measured == pytest.approx(1.2)
    tight = AcceptanceConfig(backend="onnxruntime", batch=4, min_speedup=3.0, min_ssim=0.99)
    failed = {c.name: c for c in evaluate(tight, *_records()) if not c.passed}
    assert set(failed) == {"min_speedup", "min_ssim"}
    assert failed["min_speedup"].line().startswith("FAIL  min_speedup: 2 (limit >= 3)")


def test_unmeasured_limit_fails():
    cfg = AcceptanceConfig(backend="tensorrt", batch=4, min_speedup=1.1)
    (check,) = evaluate(cfg, *_records())
    assert not check.passed and check.measured is None and "not measured" in check.line()
