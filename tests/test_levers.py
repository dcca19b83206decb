"""The levers beside pruning: fast solvers and DeepCache-style feature reuse, on every backend."""

from __future__ import annotations

import json
import typing

import numpy as np
import pytest
import torch

from compressor import config as config_module
from compressor import stack as stack_module
from compressor.config import ConfigError, load_config
from compressor.feature_reuse import FeatureReuseUNet, full_steps
from compressor.models import ReusePredictor, as_noise_predictor, build_unet, predict_noise
from compressor.pruning import pruned_copy
from compressor.sampling import SCHEDULERS, denoise, generate, initial_noise, make_scheduler
from compressor.stack import SamplerVariant
from deploy.runtimes import load_backend, onnxruntime_reuse_backend
from export.onnx_export import export_unet
from pipeline.cli import main
from tests.conftest import DDPM_SCHEDULER, TINY_COND_UNET, TINY_UNET, finished_tiny_run

THREE_LEVELS = {
    **TINY_UNET,
    "block_out_channels": [16, 32, 32],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}


def test_the_scheduler_registry_and_the_config_agree():
    assert tuple(SCHEDULERS) == stack_module.SCHEDULERS == typing.get_args(config_module.Scheduler)
    assert type(make_scheduler("dpmsolver++", DDPM_SCHEDULER)).__name__ == "DPMSolverMultistepScheduler"
    assert make_scheduler("dpmsolver++", DDPM_SCHEDULER).config.algorithm_type == "dpmsolver++"
    assert type(make_scheduler("unipc", DDPM_SCHEDULER)).__name__ == "UniPCMultistepScheduler"
    with pytest.raises(ConfigError, match="unknown scheduler 'euler'"):
        make_scheduler("euler", DDPM_SCHEDULER)


def test_a_solver_scheduler_is_fresh_for_every_loop(tiny_unet):
    """Multistep solvers keep history: the same scheduler object twice gives the same images."""
    predict = as_noise_predictor(tiny_unet)
    sched = make_scheduler("dpmsolver++", DDPM_SCHEDULER)
    noise = initial_noise((3, 16, 16), [1, 2])
    assert torch.equal(denoise(predict, sched, noise, 5), denoise(predict, sched, noise, 5))


@pytest.mark.parametrize(
    "cfg", [TINY_UNET, TINY_COND_UNET, THREE_LEVELS], ids=["unet2d", "conditional", "3-level"]
)
def test_the_shallow_pass_on_the_full_pass_feature_equals_the_whole_unet(cfg):
    unet = build_unet(cfg, seed=0).eval()
    x = torch.randn(2, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"])
    t = torch.tensor([3, 700])
    with torch.no_grad():
        reference = predict_noise(unet, x, t)
        for level in range(len(cfg["block_out_channels"]) - 1):
            split = FeatureReuseUNet(unet, level)
            noise, feature = split.full(x, t)
            assert torch.equal(noise, reference)
            assert torch.equal(split.shallow(x, t, feature), reference)
    with pytest.raises(ConfigError, match="boundary must be in 0.."):
        FeatureReuseUNet(unet, len(cfg["block_out_channels"]) - 1)


def test_feature_reuse_works_on_a_pruned_model_whose_widths_differ_per_level(tiny_unet):
    pruned = pruned_copy(tiny_unet, 0.25, None, {0: 0.5, 1: 0.0})
    assert (
        pruned.down_blocks[0].resnets[0].conv1.out_channels
        < tiny_unet.down_blocks[0].resnets[0].conv1.out_channels
    )
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([5, 400, 999])
    with torch.no_grad():
        split = FeatureReuseUNet(pruned, 0)
        noise, feature = split.full(x, t)
        assert torch.equal(split.shallow(x, t, feature), predict_noise(pruned, x, t))


def test_cache_interval_one_is_the_plain_sampler_exactly(tiny_unet):
    sched = make_scheduler("ddim", DDPM_SCHEDULER)
    plain = generate(as_noise_predictor(tiny_unet), sched, (3, 16, 16), 3, 8, seed=4)
    reuse = load_backend("torch", unet=tiny_unet, cache_level=0).predict
    assert isinstance(reuse, ReusePredictor)
    assert torch.equal(generate(reuse, sched, (3, 16, 16), 3, 8, seed=4, cache_interval=1), plain)
    cached = generate(reuse, sched, (3, 16, 16), 3, 8, seed=4, cache_interval=3)
    assert not torch.equal(
        cached, plain
    )  # the shallow passes really ran (random weights: no closeness claim)


def test_the_loop_calls_the_full_pass_only_at_the_scheduled_steps(tiny_unet):
    calls = []
    split = FeatureReuseUNet(tiny_unet, 0)

    def full(x, t):
        calls.append("full")
        return split.full(x, t)

    def shallow(x, t, f):
        calls.append("shallow")
        return split.shallow(x, t, f)

    ddim = make_scheduler("ddim", DDPM_SCHEDULER)
    denoise(ReusePredictor(full, shallow), ddim, torch.randn(1, 3, 16, 16), 7, cache_interval=3)
    assert calls == ["full", "shallow", "shallow", "full", "shallow", "shallow", "full"]
    with pytest.raises(ConfigError, match="needs a backend built for feature reuse"):
        denoise(as_noise_predictor(tiny_unet), ddim, torch.randn(1, 3, 16, 16), 3, cache_interval=2)


def test_full_step_schedules():
    assert full_steps(10, 1) == list(range(10))
    assert full_steps(10, 3) == [0, 3, 6, 9]
    quad = full_steps(50, 5, "quadratic")
    assert quad[0] == 0 and len(quad) == 10 and len(set(quad)) == 10 and max(quad) < 50
    gaps = np.diff(quad)
    assert gaps[0] < gaps[-1]  # denser early
    with pytest.raises(ConfigError):
        full_steps(10, 0)


@pytest.mark.parametrize("precision, atol", [("fp32", 1e-4), ("fp16", 2e-2)])
def test_the_exported_passes_match_torch(tmp_path, tiny_unet, precision, atol):
    pruned = pruned_copy(tiny_unet, 0.25, None)
    for name, unet in (("dense", tiny_unet), ("pruned", pruned)):
        full_file, shallow_file = tmp_path / f"{name}-full.onnx", tmp_path / f"{name}-shallow.onnx"
        export_unet(unet, full_file, precision, part="full", level=0)
        export_unet(unet, shallow_file, precision, part="shallow", level=0)
        ort = onnxruntime_reuse_backend(full_file, shallow_file, 0).predict
        split = FeatureReuseUNet(unet, 0)
        x, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 500, 999])
        with torch.no_grad():
            noise, feature = split.full(x, t)
            shallow = split.shallow(x, t, feature)
        got_noise, got_feature = ort.full(x, t)
        assert (got_noise - noise).abs().max() <= atol and (got_feature - feature).abs().max() <= atol
        assert (ort.shallow(x, t, feature) - shallow).abs().max() <= atol  # fed torch's cached feature


def test_sampler_variants_parse_and_refuse():
    assert str(SamplerVariant.parse("dpmsolver++:10")) == "dpmsolver++:10:1"
    assert SamplerVariant.parse("ddim:20:3") == SamplerVariant("ddim", 20, 3)
    cases = [("ddim", "expected SCHEDULER:STEPS"), ("euler:10", "not one of"), ("ddim:x", "integers")]
    for bad, message in [*cases, ("ddim:10:0", ">= 1")]:
        with pytest.raises(ConfigError, match=message):
            SamplerVariant.parse(bad)


def test_bench_variants_and_acceptance_variant_are_checked_with_the_config(tmp_path, tiny_config):
    with pytest.raises(ConfigError, match=r"bench.variants\[1\]: scheduler 'euler'"):
        load_config(tiny_config, ["bench.variants=[ddim:10,euler:5]"])
    with pytest.raises(ConfigError, match="acceptance.variant=unipc:5: bench does not time it"):
        load_config(tiny_config, ["bench.variants=[ddim:10]", "acceptance.variant=unipc:5"])


@pytest.mark.slow
def test_every_lever_on_a_pruned_run_bench_rows_parity_and_sample(tmp_path, capsys):
    overrides = [
        "export.feature_reuse=true",
        "export.precisions=[fp32]",
        "bench.backends=[torch,onnxruntime]",
        "bench.batch_sizes=[2]",
        "bench.repeat=3",
        "bench.sampler_repeat=1",
        "bench.variants=[ddim:4,dpmsolver++:3,unipc:3,ddim:4:2]",
        "parity.batches=[1]",
        "parity.timesteps=[0,999]",
        "parity.sampler_steps=4",
    ]
    cfg, run = finished_tiny_run(tmp_path, "prune")
    assert main([str(cfg), *overrides, "--stages", "export,parity,bench", "--run-dir", str(run)]) == 0
    bench = json.loads((run / "bench" / "record.json").read_text())["metrics"]
    sampler_rows = [r for r in bench["results"] if r["what"] == "sampler"]
    assert {(r["backend"], r["variant"]) for r in sampler_rows} == {
        (b, v)
        for b in ("torch", "onnxruntime")
        for v in ("ddim:4:1", "dpmsolver++:3:1", "unipc:3:1", "ddim:4:2")
    }
    for row in bench["results"]:
        assert {"scheduler", "steps", "cache_interval", "precision"} <= set(row)
    parity = json.loads((run / "parity" / "record.json").read_text())["metrics"]
    parts = {(r["model"], r.get("part", "unet")) for r in parity["results"]}
    assert ("pruned", "shallow pass (level 0)") in parts and ("dense", "full pass (level 0)") in parts
    assert all(r["passed"] and r["max_abs_error"] <= 1e-4 for r in parity["results"])
    out = tmp_path / "s.png"
    for backend in ("torch", "onnxruntime"):
        argv = ["sample", str(run), "--backend", backend, "--scheduler", "dpmsolver++", "--steps", "4",
                "--cache-interval", "2", "--num-images", "2", "--out", str(out)]  # fmt: skip
        assert main(argv) == 0, capsys.readouterr().err
        assert out.is_file()
    assert main(["sample", str(run), "--backend", "onnxruntime", "--precision", "int8"]) == 2
    assert "unet.int8.onnx not found" in capsys.readouterr().err  # int8 not exported by this run
    assert main(["sample", str(run), "--precision", "int8"]) == 2  # torch has no int8
    assert "int8 runs on onnxruntime or tensorrt" in capsys.readouterr().err


def test_int8_qdq_model_is_calibrated_on_the_sampler_trajectory_and_keeps_norms_in_float(tmp_path, tiny_unet):
    import onnx

    from export.quantize import calibration_inputs, quantize_unet

    fp32 = tmp_path / "unet.fp32.onnx"
    export_unet(tiny_unet, fp32, "fp32")
    ddim = make_scheduler("ddim", DDPM_SCHEDULER)
    feeds = calibration_inputs(tiny_unet, ddim, (3, 16, 16), 4, 10)
    assert len(feeds) == 10 and all(f["sample"].shape == (4, 3, 16, 16) for f in feeds)
    expected = sorted(int(t) for t in _timesteps(ddim, 10))
    assert sorted(int(f["timestep"][0]) for f in feeds) == expected  # every step the sampler visits
    info = quantize_unet(fp32, tmp_path / "unet.int8.onnx", feeds)
    assert info["calibration_inputs"] == 40 and info["dequantize_nodes"] > 0 and info["kept_in_float"] > 0
    graph = onnx.load(str(tmp_path / "unet.int8.onnx")).graph
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    weights = {i.name for i in graph.initializer}
    dq = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    weight_users = {op for n in dq if n.input[0] in weights for op in consumers.get(n.output[0], [])}
    assert weight_users <= {"Conv", "MatMul"}, weight_users  # int8 weights only where asked
    fed = {op for n in dq for op in consumers.get(n.output[0], [])}
    assert "Gemm" not in fed  # the time embedding and its projections stay float
    source = onnx.load(str(fp32)).graph
    for op in ("InstanceNormalization", "Softmax", "Sigmoid"):  # computed in float, as in fp32
        assert sum(n.op_type == op for n in graph.node) == sum(n.op_type == op for n in source.node), op
    got = onnxruntime_backend_for(tmp_path / "unet.int8.onnx")
    held_out = calibration_inputs(tiny_unet, ddim, (3, 16, 16), 2, 10, seed=99)
    errors = []
    for feed in held_out:
        x, t = torch.from_numpy(feed["sample"]), torch.from_numpy(feed["timestep"])
        errors.append(float((got(x, t) - as_noise_predictor(tiny_unet)(x, t)).abs().median()))
    assert np.median(errors) <= 0.05  # parity.median_abs_int8's default


def _timesteps(scheduler, steps: int):
    import copy

    s = copy.deepcopy(scheduler)
    s.set_timesteps(steps)
    return s.timesteps


def onnxruntime_backend_for(path):
    from deploy.runtimes import onnxruntime_backend

    return onnxruntime_backend(path).predict


def test_the_build_makes_engines_of_both_passes_with_every_input_in_the_profile(
    tmp_path, tiny_unet, monkeypatch
):
    from compressor.config import BuildConfig
    from compressor.errors import ArtifactError
    from deploy import tensorrt_backend
    from rundir import layout

    for model in ("dense", "pruned"):
        for part in ("unet", "full", "shallow"):
            path = layout.onnx_path(tmp_path, model, "fp32", part, 0)
            export_unet(tiny_unet, path, "fp32", part=part, level=0)
    built = []

    def fake_build(src, dst, profile, shapes, precision, *rest):  # TensorRT itself cannot run here
        built.append((src.name, dst.relative_to(tmp_path).as_posix(), profile.shapes(shapes)))
        return {"build_seconds": 0.0}

    monkeypatch.setattr(tensorrt_backend, "require_tensorrt", lambda: None)
    monkeypatch.setattr(tensorrt_backend, "build_engine", fake_build)
    cfg = BuildConfig(precision="fp32", min_batch=1, opt_batch=2, max_batch=4)
    engines, files = tensorrt_backend.build_run_engines(tmp_path, cfg, lambda m: None, reuse_level=0)
    assert set(engines) == {"dense", "pruned", "dense.full", "dense.shallow", "pruned.full", "pruned.shallow"}
    by_engine = {dst: (src, shapes) for src, dst, shapes in built}
    src, shapes = by_engine["build/pruned/unet-shallow-l0.engine"]
    feature = FeatureReuseUNet(tiny_unet, 0).full(torch.randn(1, 3, 16, 16), torch.tensor([5]))[1]
    assert src == "unet-shallow-l0.fp32.onnx"
    assert shapes["feature"] == tuple((b, *feature.shape[1:]) for b in (1, 2, 4))
    assert set(by_engine["build/dense/unet-full-l0.engine"][1]) == {"sample", "timestep"}
    assert layout.engine_path(tmp_path, "dense", "full", 0) in files
    built.clear()  # int8: the passes are not quantized, so only the plain graphs become engines
    for model in ("dense", "pruned"):
        export_unet(tiny_unet, layout.onnx_path(tmp_path, model, "int8"), "fp32")
    cfg = BuildConfig(precision="int8", min_batch=1, opt_batch=2, max_batch=4)
    engines, _ = tensorrt_backend.build_run_engines(tmp_path, cfg, lambda m: None, reuse_level=0)
    assert set(engines) == {"dense", "pruned"}
    with pytest.raises(ArtifactError, match="unet-full-l2.fp32.onnx not found.*export.feature_reuse=true"):
        tensorrt_backend.build_run_engines(tmp_path, BuildConfig(precision="fp32"), lambda m: None, 2)
    with pytest.raises(ArtifactError, match="unet-full-l0.engine not found; export the passes"):
        load_backend("tensorrt", run_dir=tmp_path, model="dense", cache_level=0)
