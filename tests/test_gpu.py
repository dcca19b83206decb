"""GPU and TensorRT checks. They skip, with the reason, where no CUDA device or TensorRT is present.

Run them on a CUDA host with `bash scripts/gpu_check.sh` (or `pytest -m gpu`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compressor.errors import ArtifactError, UserError
from compressor.models import example_inputs, predict_noise
from deploy import tensorrt_backend
from deploy.engine_info import Profile
from deploy.runtimes import load_backend, torch_backend
from rundir import layout
from rundir.layout import engine_info_path

NO_CUDA = "needs a CUDA GPU (none visible here)"
TRT_REASON = tensorrt_backend.unavailable_reason()

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
trt = pytest.mark.skipif(bool(TRT_REASON), reason=TRT_REASON or "TensorRT available")


@pytest.mark.gpu
@cuda
def test_torch_fp16_backend_matches_fp32(tiny_unet):
    x = example_inputs(tiny_unet, 4)
    with torch.no_grad():
        ref = predict_noise(tiny_unet, x["sample"], x["timestep"])
    fp16 = torch_backend(tiny_unet, torch.device("cuda"), torch.float16)
    got = fp16.predict(x["sample"].cuda(), x["timestep"].cuda()).cpu()
    assert (got - ref).abs().max() < 2e-2


@pytest.mark.gpu
@cuda
def test_gpu_torch_variants_match_fp32_and_leave_the_model_alone(tiny_unet):
    x = example_inputs(tiny_unet, 4)
    before = [p.detach().clone() for p in tiny_unet.parameters()]
    with torch.no_grad():
        ref = predict_noise(tiny_unet, x["sample"], x["timestep"])
    dev = torch.device("cuda")
    variants = {
        "fp16": torch_backend(tiny_unet, dev, torch.float16),
        "fp16+cudagraph": torch_backend(tiny_unet, dev, torch.float16, cuda_graph=True),
        "fp32+cudagraph": torch_backend(tiny_unet, dev, cuda_graph=True),
    }
    if torch.cuda.is_bf16_supported():
        variants["bf16"] = torch_backend(tiny_unet, dev, torch.bfloat16)
    for name, backend in variants.items():
        for _ in range(2):  # the second call replays the captured graph
            got = backend.predict(x["sample"].cuda(), x["timestep"].cuda()).cpu()
            assert (got - ref).abs().max() < (1e-1 if name == "bf16" else 2e-2), name
    assert all(torch.equal(p.detach(), q) for p, q in zip(tiny_unet.parameters(), before, strict=True))
    assert next(tiny_unet.parameters()).device.type == "cpu"


@pytest.mark.gpu
@cuda
def test_bf16_training_steps_on_cuda(tmp_path):
    from compressor.config import FinetuneConfig
    from compressor.models import build_unet
    from compressor.sampling import make_scheduler
    from compressor.training import train
    from tests.conftest import DDPM_SCHEDULER, TINY_UNET

    images = torch.rand(16, 3, 16, 16) * 2 - 1
    cfg = FinetuneConfig(steps=3, batch_size=4, mixed_precision="bf16", checkpoint_every=3)
    result = train(
        build_unet(TINY_UNET),
        make_scheduler("ddpm", DDPM_SCHEDULER),
        images,
        cfg,
        tmp_path,
        0,
        torch.device("cuda"),
    )
    assert len(result.losses) >= 1 and all(torch.isfinite(torch.tensor(v)) for _, v in result.losses)


@pytest.mark.gpu
@cuda
def test_onnxruntime_cuda_provider_when_installed(tiny_unet, tmp_path):
    import onnxruntime as ort

    from deploy.runtimes import onnxruntime_backend
    from export.onnx_export import export_unet

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed (CPU onnxruntime only)")
    path = tmp_path / "u.onnx"
    export_unet(tiny_unet, path, "fp32")
    backend = onnxruntime_backend(path, providers="cuda")
    assert backend.info["provider"] == "CUDAExecutionProvider"
    x = example_inputs(tiny_unet, 2)
    with torch.no_grad():
        ref = predict_noise(tiny_unet, x["sample"], x["timestep"])
    assert (backend.predict(x["sample"], x["timestep"]).cpu() - ref).abs().max() < 1e-3


def _fp16_engine(unet, run: Path, model: str, part: str = "unet") -> None:
    """Export ``part`` of ``unet`` in fp16 into ``run`` and build its engine (batch 1..4)."""
    from export.onnx_export import export_unet, onnx_input_shapes

    onnx_file = layout.onnx_path(run, model, "fp16", part, 0)  # strongly typed: fp16 from the fp16 ONNX
    export_unet(unet, onnx_file, "fp16", part=part, level=0)
    tensorrt_backend.build_engine(
        onnx_file,
        layout.engine_path(run, model, part, 0),
        Profile(1, 2, 4),
        onnx_input_shapes(onnx_file),
        "fp16",
        1.0,
        3,
        run / "timing.cache",
        f"{model} {part}",
    )


@pytest.fixture
def engine_run(tiny_unet, tmp_path):
    """A run directory with dense/pruned fp16 engines of a tiny UNet (TensorRT only)."""
    tensorrt_backend.require_tensorrt()
    for model in ("dense", "pruned"):
        _fp16_engine(tiny_unet, tmp_path, model)
    return tmp_path


@pytest.mark.gpu
@pytest.mark.tensorrt
@trt
def test_engine_matches_torch_through_polygraphy(engine_run, tiny_unet):
    from export.compare import compare, make_torch_runner, parity_feeds

    runner, profile = tensorrt_backend.make_trt_runner(layout.engine_path(engine_run, "dense"), "trt")
    feeds = parity_feeds(tiny_unet, [1, 4], [0, 500, 999])
    report = compare([make_torch_runner(tiny_unet, "torch", "cuda"), runner], feeds, 2e-2, 2e-2)[0]
    assert report.passed, report.max_abs_error
    assert (engine_run / "timing.cache").stat().st_size > 0


@pytest.mark.gpu
@pytest.mark.tensorrt
@trt
def test_cuda_graph_replay_equals_plain_execution(engine_run, tiny_unet):
    plain = load_backend("tensorrt", run_dir=engine_run, model="dense")
    graph = load_backend("tensorrt", run_dir=engine_run, model="dense", cuda_graph=True)
    x = example_inputs(tiny_unet, 2, "cuda")
    for _ in range(3):
        assert torch.equal(
            plain.predict(x["sample"], x["timestep"]), graph.predict(x["sample"], x["timestep"])
        )


@pytest.mark.gpu
@pytest.mark.tensorrt
@trt
def test_engine_refusals(engine_run, tiny_unet):
    backend = load_backend("tensorrt", run_dir=engine_run, model="dense")
    x = example_inputs(tiny_unet, 8, "cuda")
    with pytest.raises(UserError, match="outside the profile"):
        backend.predict(x["sample"], x["timestep"])
    engine = layout.engine_path(engine_run, "dense")
    manifest = json.loads(engine_info_path(engine).read_text())
    manifest["tensorrt_version"] = "0.0.1"
    engine_info_path(engine).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="built with TensorRT 0.0.1"):
        load_backend("tensorrt", run_dir=engine_run, model="dense")
    engine.write_bytes(engine.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="does not match its engine info"):
        load_backend("tensorrt", run_dir=engine_run, model="dense")


@pytest.fixture
def pass_engines(tiny_unet, tmp_path):
    """fp16 engines of the tiny UNet's full and shallow feature-reuse passes (TensorRT only)."""
    tensorrt_backend.require_tensorrt()
    for part in ("full", "shallow"):
        _fp16_engine(tiny_unet, tmp_path, "dense", part)
    return tmp_path


@pytest.mark.gpu
@pytest.mark.tensorrt
@trt
def test_feature_reuse_engines_match_the_torch_passes(pass_engines, tiny_unet):
    from compressor.feature_reuse import FeatureReuseUNet

    split = FeatureReuseUNet(tiny_unet, 0)
    engines = load_backend("tensorrt", run_dir=pass_engines, model="dense", cache_level=0).predict
    graphs = load_backend("tensorrt", run_dir=pass_engines, model="dense", cache_level=0, cuda_graph=True)
    x = example_inputs(tiny_unet, 3)
    with torch.no_grad():
        noise, feature = split.full(x["sample"], x["timestep"])
        shallow = split.shallow(x["sample"], x["timestep"], feature)
    got_noise, got_feature = engines.full(x["sample"].cuda(), x["timestep"].cuda())
    assert (got_noise.cpu() - noise).abs().max() < 2e-2
    assert (got_feature.float().cpu() - feature).abs().max() < 2e-2
    got = engines.shallow(x["sample"].cuda(), x["timestep"].cuda(), feature.cuda())  # torch's feature
    assert (got.cpu() - shallow).abs().max() < 2e-2
    for _ in range(2):  # replayed CUDA graphs give the plain engines' outputs
        replay = graphs.predict.shallow(x["sample"].cuda(), x["timestep"].cuda(), feature.cuda())
        assert torch.equal(replay, got)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible: the check would run")
def test_gpu_check_refuses_cleanly_without_cuda():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        ["bash", str(root / "scripts" / "gpu_check.sh"), "--no-tensorrt"],
        capture_output=True,
        text=True,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "gpu_check: no CUDA device (torch.cuda.is_available() is False here); run it on a CUDA host"
    ]
