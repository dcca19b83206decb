"""TensorRT API conformance on CPU: NVIDIA's real 10.13 and 11.4 Python bindings, without a GPU.

``../shared/tools/trt-api/setup DIR 10|11`` makes the real bindings importable with every
factory (Builder, Runtime, OnnxParser) raising TypeError. Each check runs in a subprocess
(tests/trt_api_check.py) so the rest of the suite keeps seeing this host's own TensorRT.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.runner import run_pipeline
from tests.conftest import finished_tiny_run
from tests.test_components import write_pipeline
from tests.test_conditional_build import TOKENS, _cfg
from tests.test_conditioning_data import captioned

ROOT = Path(__file__).resolve().parent.parent
SETUP = ROOT.parent / "shared" / "tools" / "trt-api" / "setup"


@pytest.fixture(scope="module", params=[10, 11], ids=["tensorrt-10.13", "tensorrt-11.4"])
def trt_api(request, tmp_path_factory) -> Path:
    """A folder whose ``tensorrt`` is TensorRT's real Python API (no libraries)."""
    if not SETUP.is_file():
        pytest.skip(
            f"{SETUP} not found (the API-only TensorRT setup lives in the developers' workspace "
            "beside the project, not in a clone: docs/gpu.md)"
        )
    if shutil.which("gcc") is None:
        pytest.skip("gcc not found (the API-only TensorRT setup compiles stub libraries)")
    folder = tmp_path_factory.mktemp(f"trt{request.param}")
    done = subprocess.run(
        ["bash", str(SETUP), str(folder), str(request.param)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return folder


def _env(trt_api: Path) -> dict:
    path = os.pathsep.join([str(trt_api), str(ROOT)])
    return {**os.environ, "PYTHONPATH": path, "CUDA_VISIBLE_DEVICES": ""}


def _check(trt_api: Path, *args: str) -> dict:
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "trt_api_check.py"), *args],
        capture_output=True,
        text=True,
        env=_env(trt_api),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_tensorrt_name_the_project_and_polygraphy_use_exists(trt_api):
    report = _check(trt_api)
    assert report["api_only"]
    assert report["problems"] == []
    assert report["project_checked"] >= 50 and report["polygraphy_checked"] >= 40


def test_the_checker_notices_a_missing_name_and_a_wrong_keyword(trt_api):
    table = {"IBuilderConfig": {"set_timing_cache": ["cache", "ignore_mismatches"], "set_flag_v9": None}}
    table["NoSuchClass"] = {}
    script = f"import json, tests.trt_api_check as c; print(json.dumps(c.check_table({table!r})[1]))"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=_env(trt_api), timeout=120
    )
    problems = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(problems) == 3, problems
    assert any("ignore_mismatches" in p for p in problems)


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory):
    return finished_tiny_run(tmp_path_factory.mktemp("trt-run"), "prune,export")


@pytest.fixture(scope="module")
def sd_exported_run(tmp_path_factory, clip_tokenizer_folder) -> Path:
    """A tiny SD-layout pipeline pruned, finetuned for 2 steps and exported (its three graphs)."""
    root = tmp_path_factory.mktemp("trt-sd")
    pipe = write_pipeline(root / "pipe", tokenizer=clip_tokenizer_folder(TOKENS))
    run_pipeline(_cfg(pipe, captioned(root / "images", 4)), root / "run", ["prune", "finetune", "export"])
    return root / "run"


def _build_check(trt_api: Path, run_dir: Path, copy: Path, guidance: float, shapes: str = "dynamic") -> dict:
    """tests/trt_api_check.py's build of a copy of ``run_dir`` on stand-ins of the real factories."""
    shutil.copytree(run_dir, copy)
    return _check(trt_api, str(copy), str(guidance), shapes)


# what the build and run paths call on TensorRT objects, each held to the real signature
CALLS = {
    "Builder.__init__", "Builder.create_network", "Builder.build_serialized_network", "OnnxParser.__init__",
    "OnnxParser.parse_from_file", "IOptimizationProfile.set_shape", "IBuilderConfig.add_optimization_profile",
    "IBuilderConfig.set_memory_pool_limit", "IBuilderConfig.set_timing_cache", "Runtime.__init__",
    "Runtime.deserialize_cuda_engine", "ICudaEngine.get_tensor_dtype", "IExecutionContext.set_input_shape",
    "IExecutionContext.set_tensor_address", "IExecutionContext.execute_async_v3",
    "ICudaEngine.get_device_memory_size_for_profile_v2",
}  # fmt: skip


def test_a_text_to_image_run_builds_and_runs_its_three_engines_on_the_real_api(
    trt_api, sd_exported_run, tmp_path
):
    """build_run_engines -> build_engine and EngineRunner on every engine of a conditional run, with
    the factories replaced by stand-ins holding each call to the real bindings' signatures."""
    report = _build_check(trt_api, sd_exported_run, tmp_path / "run", 3.0)
    assert report["problems"] == [] and report["calls_unchecked"] == []
    assert CALLS <= set(report["calls_checked"])
    engines = report["engines"]
    assert list(engines) == ["dense", "pruned", "shared.text_encoder", "shared.vae_decoder"]
    guided = {"min_batch": 2, "opt_batch": 4, "max_batch": 6}  # build batches 1/2/3, two UNet rows per image
    for model in ("dense", "pruned"):
        assert engines[model]["profile"] == guided
        assert list(engines[model]["inputs"]) == ["sample", "timestep", "encoder_hidden_states"]
        assert engines[model]["engine_types"]["timestep"] == "int64"
        assert engines[model]["outputs"]["noise"][0] == 4
    text, vae = engines["shared.text_encoder"], engines["shared.vae_decoder"]
    assert text["engine"] == "build/shared/text_encoder.plan"
    assert text["profile"] == {"min_batch": 1, "opt_batch": 2, "max_batch": 3}
    assert text["inputs"] == {"input_ids": [TOKENS]} and text["engine_types"] == {"input_ids": "int64"}
    assert text["outputs"]["last_hidden_state"][:2] == [2, TOKENS]
    assert vae["engine"] == "build/shared/vae_decoder.plan" and vae["inputs"]["latent_sample"][0] == 4
    assert "build/shared/vae_decoder.plan.json" in report["files"]
    for key, engine in engines.items():  # the record's sizes: the file, the workspace limit, the memory
        assert engine["engine_bytes"] == engine["engine_file_bytes"] > 0, key
        assert engine["workspace_bytes"] == 8 << 30 and engine["device_memory_bytes"] == 3 << 20
        assert engine["shapes"] == "dynamic"
    assert text["profile_shapes"] == {"input_ids": [[1, TOKENS], [2, TOKENS], [3, TOKENS]]}
    assert engines["dense"]["profile_shapes"]["encoder_hidden_states"][2][0] == 6
    sampler = report["sampler"]  # load_sampler(RUN, backend="tensorrt") over the three engines
    assert sampler["engines"] == ["text_encoder", "unet", "vae_decoder"]
    assert sampler["info"]["text_encoder"].endswith("build/shared/text_encoder.plan")
    fed = sampler["fed"]
    assert fed["text_encoder.plan"] == [{"input_ids": [2, TOKENS]}] * 2  # the prompts, then the negative
    latent = engines["shared.vae_decoder"]["inputs"]["latent_sample"]
    assert fed["unet.engine"][0]["sample"] == [4, *latent]  # 2 images x 2 rows under guidance
    assert fed["unet.engine"][0]["encoder_hidden_states"][:2] == [4, TOKENS] and len(fed["unet.engine"]) == 2
    assert fed["vae_decoder.plan"] == [{"latent_sample": [2, *latent]}]
    assert sampler["images"][0] == 2
    assert sampler["refusal"].startswith("tensorrt sampler: the unet engine ")
    assert "[8, " in sampler["refusal"] and "(4 images x 2 rows under guidance)" in sampler["refusal"]


def test_static_shapes_build_every_engine_at_one_shape_on_the_real_api(trt_api, sd_exported_run, tmp_path):
    report = _build_check(trt_api, sd_exported_run, tmp_path / "run", 3.0, "static")
    assert report["problems"] == [] and report["calls_unchecked"] == []
    engines = report["engines"]
    assert {k: e["shapes"] for k, e in engines.items()} == dict.fromkeys(engines, "static")
    assert engines["dense"]["profile"] == {"min_batch": 4, "opt_batch": 4, "max_batch": 4}  # opt 2 x 2 rows
    for key, engine in engines.items():
        for name, (lo, opt, hi) in engine["profile_shapes"].items():
            assert lo == opt == hi, (key, name)
    assert engines["shared.text_encoder"]["profile_shapes"]["input_ids"][0] == [2, TOKENS]
    sampler = report["sampler"]
    assert sampler["fed"]["unet.engine"][0]["sample"][0] == 4 and sampler["images"][0] == 2
    assert "build.shapes=static build.opt_batch=4" in sampler["refusal"]


def test_a_size_range_sets_every_spatial_side_on_the_real_profile_api(trt_api, sd_exported_run, tmp_path):
    """build.sizes on stand-ins: the UNets and VAE decoder from the graphs of any side, their profile's
    sample / latent_sample sides set through IOptimizationProfile.set_shape as recorded."""
    report = _build_check(trt_api, sd_exported_run, tmp_path / "run", 3.0, "sizes:16,24,32")
    assert report["problems"] == [] and report["calls_unchecked"] == []
    engines = report["engines"]
    assert engines["dense"]["onnx"] == "build/graphs/dense.fp32.onnx"
    assert engines["shared.vae_decoder"]["onnx"] == "build/graphs/vae_decoder.fp32.onnx"
    lo, opt, hi = engines["dense"]["profile_shapes"]["sample"]
    assert [lo[0], opt[0], hi[0]] == [2, 4, 6] and [lo[2], opt[2], hi[3]] == [8, 12, 16]  # latents: px / 2
    assert engines["dense"]["profile"]["sizes"] == [8, 12, 16]
    assert engines["shared.vae_decoder"]["profile_shapes"]["latent_sample"][2][1:] == [4, 16, 16]
    assert "sizes" not in engines["shared.text_encoder"]["profile"]


def test_an_unconditional_run_builds_its_two_engines_as_before_on_the_real_api(
    trt_api, exported_run, tmp_path
):
    _, run_dir = exported_run
    report = _build_check(trt_api, run_dir, tmp_path / "run", 1.0)
    assert report["problems"] == [] and report["calls_unchecked"] == []
    assert list(report["engines"]) == ["dense", "pruned"]
    dense = report["engines"]["dense"]
    assert dense["profile"] == {"min_batch": 1, "opt_batch": 2, "max_batch": 3}
    assert list(dense["inputs"]) == ["sample", "timestep"]
    assert report["files"] == [
        "build/dense/unet.engine", "build/dense/unet.engine.json", "build/pruned/unet.engine",
        "build/pruned/unet.engine.json", "build/timing.cache",
    ]  # fmt: skip


def test_the_stand_ins_notice_a_call_the_real_api_would_refuse(trt_api):
    script = (
        "import json, tensorrt as trt, tests.trt_api_check as c\n"
        "c.REAL.update({n: getattr(trt, n) for n in ('IOptimizationProfile', 'ITimingCache', 'Dims')})\n"
        "cache = c.Fake('ITimingCache', [])\n"
        "print(json.dumps([\n"
        "  c.bind_problem(trt.IOptimizationProfile.set_shape, 'set_shape',"
        " ('x', (1, 2), (2, 2), (0, 2)), {}),\n"
        "  c.bind_problem(trt.IBuilderConfig.set_timing_cache, 'set_timing_cache', (cache,),"
        " {'ignore_mismatches': True}),\n"
        "  c.bind_problem(trt.IBuilderConfig.set_memory_pool_limit, 'set_memory_pool_limit', (0, 5), {}),\n"
        "  c.bind_problem(trt.IExecutionContext.set_input_shape, 'set_input_shape', ('x', (2, 6)), {}),\n"
        "]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=_env(trt_api), timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    shape, keyword, pool, fine = json.loads(done.stdout.strip().splitlines()[-1])
    assert "max: (0, 2) for Dims" in shape
    assert "unknown ['ignore_mismatches']" in keyword and "missing ['ignore_mismatch']" in keyword
    assert "pool: int for MemoryPoolType" in pool
    assert fine == ""


def test_build_refuses_and_the_stage_skips_with_one_line_when_only_the_api_imports(trt_api, exported_run):
    cfg, run_dir = exported_run
    command = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "build", str(run_dir)],
        capture_output=True,
        text=True,
        env=_env(trt_api),
        cwd=ROOT,
        timeout=300,
    )
    errors = [line for line in command.stderr.splitlines() if line.startswith("error: ")]
    assert command.returncode == 2, command.stderr[-2000:]
    assert len(errors) == 1 and "no CUDA device is visible" in errors[0], command.stderr[-2000:]
    assert "Traceback" not in command.stderr
    stage = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", str(cfg), "--stages", "build", "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        env=_env(trt_api),
        cwd=ROOT,
        timeout=300,
    )
    assert stage.returncode == 0, stage.stderr[-2000:]
    record = json.loads((run_dir / "build" / "record.json").read_text())
    assert record["status"] == "skipped" and "no CUDA device is visible" in record["reason"]
    assert "Traceback" not in stage.stderr


def test_an_engine_bundle_under_the_real_tensorrt_api_refuses_without_a_gpu_in_one_line(
    trt_api, exported_run, tmp_path
):
    """The bundle runtime imports the real bindings and cuda-python, then names what is missing."""
    pytest.importorskip("cuda.bindings.runtime", reason="cuda-bindings (a dev extra) is not installed")
    from deploy.edge_bundle import BundleSpec, make_bundle
    from tests.conftest import placeholder_engines

    _, run_dir = exported_run
    written = placeholder_engines(run_dir)
    try:
        make_bundle(run_dir, tmp_path / "bundle", BundleSpec(steps=2, engine=True))
    finally:
        for path in written:
            path.unlink()
    env = {**os.environ, "PYTHONPATH": str(trt_api), "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "bundle_runtime", "info"]
    done = subprocess.run(
        command, cwd=tmp_path / "bundle", capture_output=True, text=True, env=env, timeout=300
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith("error: CUDA cudaGetDevice failed: cudaError"), lines
    done = subprocess.run(
        command[:3] + ["--fallback", "info"], cwd=tmp_path / "bundle", capture_output=True, text=True, env=env
    )
    assert done.returncode == 0 and "fell back: CUDA cudaGetDevice failed" in done.stdout
