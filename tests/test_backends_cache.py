"""Backends never change the model they are given; stage keys cover device, threads and libraries."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from compressor.config import load_config
from compressor.errors import UserError
from compressor.models import example_inputs
from deploy.runtimes import torch_backend
from pipeline import cache
from pipeline.cli import main
from pipeline.stages import STAGES
from tests.conftest import finished_tiny_run
from tests.test_reliability import _statuses


def _snapshot(module: torch.nn.Module) -> dict:
    return {
        "params": [(id(p), p.dtype, p.device, p.detach().clone()) for p in module.parameters()],
        "training": module.training,
    }


def _assert_unchanged(module: torch.nn.Module, snap: dict) -> None:
    assert module.training == snap["training"]
    for p, (pid, dtype, device, value) in zip(module.parameters(), snap["params"], strict=True):
        assert id(p) == pid and p.dtype == dtype and p.device == device and torch.equal(p.detach(), value)


def test_reduced_and_full_precision_backends_share_one_module(tiny_unet):
    """The CUDA bench crash, on CPU: fp16 built first used to turn the fp32 backend's model half."""
    tiny_unet.train()
    snap = _snapshot(tiny_unet)
    x = example_inputs(tiny_unet, 2)
    half = torch_backend(tiny_unet, torch.device("cpu"), torch.float16)
    bf16 = torch_backend(tiny_unet, torch.device("cpu"), torch.bfloat16)
    full = torch_backend(tiny_unet, torch.device("cpu"))  # "Input type (float) and bias type (Half)" before
    ref = full.predict(x["sample"], x["timestep"])
    for backend, tol in ((half, 2e-2), (bf16, 1e-1)):
        out = backend.predict(x["sample"], x["timestep"])
        assert out.dtype == torch.float32 and (out - ref).abs().max() < tol
    assert [b.info["precision"] for b in (half, bf16, full)] == ["fp16", "bf16", "fp32"]
    _assert_unchanged(tiny_unet, snap)


def test_cuda_graph_backend_refuses_a_cpu_device(tiny_unet):
    with pytest.raises(UserError, match="CUDA graphs need a CUDA device"):
        torch_backend(tiny_unet, torch.device("cpu"), cuda_graph=True)


# small measurements: these tests are about what reruns, not about the figures
QUICK = [
    "bench.backends=[torch,onnxruntime]",
    "bench.batch_sizes=[1]",
    "bench.repeat=2",
    "bench.warmup=0",
    "bench.sampler_repeat=1",
    "bench.sampler_steps=2",
    "parity.batches=[1]",
    "parity.timesteps=[0,999]",
    "parity.sampler_images=1",
    "parity.sampler_steps=2",
    "export.precisions=[fp32]",
]
STAGES_MEASURED = "prune,export,parity,bench"


@pytest.fixture(scope="module")
def measured_run(tmp_path_factory):
    cfg, run_dir = finished_tiny_run(tmp_path_factory.mktemp("envkeys"), "prune")
    assert main([str(cfg), *QUICK, "--stages", STAGES_MEASURED, "--run-dir", str(run_dir)]) == 0
    return cfg, run_dir


def test_bench_leaves_the_runs_dense_model_unchanged(measured_run):
    from pipeline.context import RunContext
    from pipeline.stages import bench

    cfg_path, run_dir = measured_run
    cfg = load_config(cfg_path, [*QUICK, "bench.backends=[torch]"])
    ctx = RunContext(cfg, run_dir)
    snap = _snapshot(ctx.dense.unet)
    result = bench.run(ctx)
    assert {r["backend"] for r in result.metrics["results"]} == {"torch"}
    _assert_unchanged(ctx.dense.unet, snap)


def test_changing_threads_reruns_bench_and_parity_and_nothing_else(measured_run, tmp_path, capsys):
    cfg_path, base = measured_run
    run_dir = tmp_path / "run"
    shutil.copytree(base, run_dir)
    capsys.readouterr()
    argv = [str(cfg_path), *QUICK, "threads=1", "--stages", STAGES_MEASURED, "--run-dir", str(run_dir)]
    assert main(argv) == 0
    status = _statuses(capsys)
    assert status == {
        "prune": "cached",
        "export": "cached",
        "parity": "(its config changed (threads))",
        "bench": "(its config changed (threads))",
    }


def _keys(cfg, facts) -> dict[str, str]:
    ctx = SimpleNamespace(cfg=cfg, run_dir=Path("/nonexistent-run"), device=torch.device("cpu"))
    return {name: cache.stage_key(ctx, name, module)["key"] for name, module in STAGES.items()}


def test_device_and_library_versions_key_only_the_stages_that_measure(monkeypatch, tiny_config):
    facts = {"torch": "2.13.0", "onnx": "1.0", "onnxruntime": "1.32.0 [CPUExecutionProvider]"}
    facts |= {"polygraphy": "0.53", "tensorrt": None, "gpu": None}
    monkeypatch.setattr(cache, "environment_facts", lambda device: facts)
    cfg = load_config(tiny_config, ["device=cpu"])
    before = _keys(cfg, facts)
    after = _keys(dataclasses.replace(cfg, device="cuda"), facts)
    assert {s for s in before if before[s] != after[s]} == {"bench", "parity", "build"}
    facts = {**facts, "onnxruntime": "1.32.0 [CUDAExecutionProvider, CPUExecutionProvider]"}
    monkeypatch.setattr(cache, "environment_facts", lambda device: facts)
    newer = _keys(cfg, facts)
    assert {s for s in before if before[s] != newer[s]} == {"bench", "parity"}
    facts = {**facts, "gpu": "NVIDIA H100 80GB HBM3 (sm_90)"}
    monkeypatch.setattr(cache, "environment_facts", lambda device: facts)
    on_gpu = _keys(cfg, facts)
    assert {s for s in newer if newer[s] != on_gpu[s]} == {"bench", "parity", "build"}
    sampled = _keys(load_config(tiny_config, ["device=cpu", "sample.seed=7"]), facts)
    assert sampled["parity"] != on_gpu["parity"]  # parity's sampler images read sample.seed


def test_a_latency_target_keys_prune_on_the_host_and_the_sampler_steps(monkeypatch, tiny_config):
    from pipeline.stages import prune as prune_stage

    facts = {"torch": "2.13.0", "onnx": "1.0", "onnxruntime": "1.32.0 [CPUExecutionProvider]"}
    for module in (cache, prune_stage):
        monkeypatch.setattr(module, "environment_facts", lambda device: facts)

    def prune_key(*overrides: str) -> str:
        return _keys(load_config(tiny_config, ["device=cpu", *overrides]), facts)["prune"]

    # a ratio target: neither the host nor bench settings concern prune
    assert prune_key() == prune_key("bench.sampler_steps=7")
    target = ["prune.ratio=null", "prune.target_latency.speedup=1.5"]
    assert prune_key(*target) == prune_key(*target, "bench.sampler_steps=7")  # a UNet-call target
    sampler = [*target, "prune.target_latency.what=sampler"]
    assert prune_key(*sampler) != prune_key(*sampler, "bench.sampler_steps=7")
    before = prune_key(*target), prune_key()
    facts["onnxruntime"] = "1.33.0 [CPUExecutionProvider]"
    assert prune_key(*target) != before[0] and prune_key() == before[1]  # measured on another runtime


def test_environment_change_is_the_logged_reason(measured_run, tmp_path, monkeypatch, capsys):
    cfg_path, base = measured_run
    run_dir = tmp_path / "run"
    shutil.copytree(base, run_dir)
    real = cache.environment_facts

    def newer_onnxruntime(device):
        return {**real(device), "onnxruntime": "9.9.9 [CPUExecutionProvider]"}

    monkeypatch.setattr(cache, "environment_facts", newer_onnxruntime)
    capsys.readouterr()
    assert main([str(cfg_path), *QUICK, "--stages", STAGES_MEASURED, "--run-dir", str(run_dir)]) == 0
    status = _statuses(capsys)
    assert status["prune"] == status["export"] == "cached"
    for stage in ("parity", "bench"):
        assert status[stage].startswith("(its environment changed (onnxruntime ")
        assert "-> 9.9.9 [CPUExecutionProvider]" in status[stage]
