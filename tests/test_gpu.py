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


@pytest.fixture(scope="module")
def text_to_image_engines(tmp_path_factory, clip_tokenizer_folder) -> dict[str, Path]:
    """A tiny text-to-image run (CLIP text encoder, conditioned UNet, VAE) pruned, finetuned and exported
    once, then built twice: ``dynamic`` (images 1..4, opt 2) and ``static`` (2 images) (TensorRT only)."""
    import shutil

    from pipeline.runner import run_pipeline
    from tests.conftest import conditional_config, text_to_image_folders

    tensorrt_backend.require_tensorrt()
    root = tmp_path_factory.mktemp("t2i-engines")
    pipe, data = text_to_image_folders(root, clip_tokenizer_folder)
    build = {"precision": "fp32", "min_batch": 1, "opt_batch": 2, "max_batch": 4, "workspace_gib": 1.0}
    runs = {}
    for shapes in ("dynamic", "static"):
        cfg = conditional_config(
            pipe, data, export={"precisions": ["fp32"]}, build={**build, "shapes": shapes}
        )
        runs[shapes] = root / shapes
        if shapes == "static":  # the same exported run, built again with other shapes
            shutil.copytree(runs["dynamic"], runs[shapes], ignore=shutil.ignore_patterns("build"))
            run_pipeline(cfg, runs[shapes], ["build"])
        else:
            run_pipeline(cfg, runs[shapes], ["prune", "finetune", "export", "build"])
    return runs


@pytest.mark.gpu
@pytest.mark.tensorrt
@trt
@pytest.mark.parametrize("shapes", ["dynamic", "static"])
def test_text_to_image_engines_generate_what_onnx_runtime_does(text_to_image_engines, shapes):
    """The three engines (text encoder, guided UNet, VAE decoder) built with static and dynamic shapes,
    each recorded with its size, workspace and device memory; a prompt through the TensorRT sampler
    against the same call on ONNX Runtime (the fp32 graphs the engines were built from)."""
    from deploy.onnx_text_to_image import psnr
    from deploy.sampler import load_sampler
    from rundir.records import read_record

    run = text_to_image_engines[shapes]
    record = read_record(run, "build")
    engines = record.metrics["engines"]
    assert list(engines) == ["dense", "pruned", "shared.text_encoder", "shared.vae_decoder"]
    for key, info in engines.items():
        assert info["shapes"] == shapes and info["workspace_bytes"] == 1 << 30, key
        assert info["engine_bytes"] > 0 and isinstance(info["device_memory_bytes"], int), key
        rows = 2 if key in ("dense", "pruned") else 1
        opt = [r[0] for r in info["profile_shapes"].values()]
        assert set(opt) == ({2 * rows} if shapes == "static" else {rows}), (key, info["profile_shapes"])
    engine = layout.shared_engine_path(run, "text_encoder")
    assert engines["shared.text_encoder"]["engine_bytes"] == engine.stat().st_size
    prompts = ["a handwritten digit three", "a handwritten digit seven"]
    call = {"num_images": 2, "batch_size": 2, "steps": 3, "prompts": prompts, "guidance_scale": 3.0}
    trt_sampler = load_sampler(run, backend="tensorrt")
    assert set(trt_sampler.engines) == {"unet", "text_encoder", "vae_decoder"}
    got = trt_sampler(**call, seed=4).float().cpu()
    want = load_sampler(run, backend="onnxruntime")(**call, seed=4).float().cpu()
    assert got.shape == want.shape and float(psnr(got, want)) > 35.0
    seeded = trt_sampler(**{**call, "num_images": 0}, seeds=[4, 5]).float().cpu()
    assert torch.allclose(seeded, got, atol=1e-3)
    if shapes == "static":
        with pytest.raises(UserError, match=r"build.shapes=static build.opt_batch=3"):
            trt_sampler(**{**call, "num_images": 3, "batch_size": 3})
    else:
        with pytest.raises(UserError, match=r"\(5 images x 2 rows under guidance\)"):
            trt_sampler(**{**call, "num_images": 5, "batch_size": 5})


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
