"""The bench stage on conditional models: UNet calls fed their conditioning (at twice the batch under
guidance), and the whole text-to-image call (text encoder, guided UNet loop, VAE decoder) timed by
component, dense against compressed; the acceptance gates on the sampler read that whole call."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from compressor.config import AcceptanceConfig, config_from_mapping
from compressor.guidance import Conditioning
from compressor.models import as_noise_predictor, load_model
from compressor.prompts import PromptSet
from compressor.sampling import make_scheduler
from deploy import tensorrt_backend
from deploy.whole_call import WholeCall, unavailable_reason, whole_call
from pipeline.acceptance import evaluate
from pipeline.runner import run_pipeline
from rundir import layout
from rundir.records import BenchMetrics, read_metrics
from tests.conftest import DDPM_SCHEDULER, TINY_UNET, conditional_config, write_images, write_model_folder
from tests.test_components import write_pipeline
from tests.test_conditioning_data import captioned, class_tree

TOKENS = 6
STAGES = ["prune", "finetune", "bench"]


def _cfg(model: Path, data: Path, guidance: float = 3.0, **bench) -> object:
    timing = {"backends": ["torch"], "batch_sizes": [1, 2], "sampler_steps": 3, "warmup": 1, "repeat": 2,
              "sampler_repeat": 2}  # fmt: skip
    return conditional_config(model, data, sample={"guidance_scale": guidance}, bench={**timing, **bench})


def _rows(metrics: dict, what: str) -> list[dict]:
    return [r for r in metrics["results"] if r["what"] == what]


def _text_pipeline(tmp_path: Path, clip_tokenizer_folder) -> tuple[Path, Path]:
    pipe = write_pipeline(tmp_path / "pipe", tokenizer=clip_tokenizer_folder(TOKENS))
    return pipe, captioned(tmp_path / "images", 4)


def test_a_text_to_image_run_times_the_whole_call_by_component(tmp_path, clip_tokenizer_folder):
    pipe, data = _text_pipeline(tmp_path, clip_tokenizer_folder)
    run = tmp_path / "run"
    cfg = _cfg(pipe, data, backends=["torch", "onnxruntime"])
    cfg.export.precisions = ["fp32"]
    first = run_pipeline(cfg, run, ["prune", "finetune", "export", "bench"])
    m = first["bench"]["metrics"]

    # the UNet call is fed the prompts' embeddings on twice the batch, as each guided step calls it
    for row in _rows(m, "unet"):
        assert row["unet_batch"] == 2 * row["batch"] and "2 x batch" in row["guidance"]
    assert {r["guidance_scale"] for r in _rows(m, "sampler")} == {3.0}

    rows = _rows(m, "pipeline")
    assert {(r["backend"], r["batch"], r["model"]) for r in rows} == {
        (k, b, x) for k in ("torch", "onnxruntime") for b in (1, 2) for x in ("dense", "pruned")
    }
    where = {"torch": "torch fp32", "onnxruntime": "onnxruntime fp32 graph"}
    for row in rows:
        parts = row["components"]
        assert list(parts) == ["text_encoder", "unet_loop", "vae_decoder"]
        assert all(v > 0 for v in parts.values())
        # timed inside the same calls: the parts add up to the call (the median of 2 runs is their mean)
        assert 0.9 * row["median_ms"] <= sum(parts.values()) <= row["median_ms"] * 1.0001
        on = where[row["backend"]]
        assert row["components_on"] == {"text_encoder": on, "vae_decoder": on}
        assert (row["steps"], row["variant"], row["runs"]) == (3, "ddim:3:1", 2)
    for s in [s for s in m["speedup"] if s["what"] == "pipeline"]:
        dense, pruned = (next(r for r in rows if (r["backend"], r["batch"], r["model"]) == (s["backend"],
                         s["batch"], x)) for x in ("dense", "pruned"))  # fmt: skip
        assert s["speedup"] == pytest.approx(dense["median_ms"] / pruned["median_ms"])
        loop = dense["components"]["unet_loop"] / pruned["components"]["unet_loop"]
        assert s["unet_loop_speedup"] == pytest.approx(loop)
    assert m["conditioning"]["guidance_scale"] == 3.0 and m["conditioning"]["guided_unet_batch"] == "2x"
    assert m["conditioning"]["prompts"] == [f"image {i}" for i in range(4)]

    # the sampler gates read the whole call (what a user waits for), the UNet gates the UNet call
    bench = read_metrics(run, "bench")
    assert bench.whole_call
    gates = AcceptanceConfig(
        backend="onnxruntime", batch=2, max_image_ms=1e9, min_sampler_speedup=1e-9, min_speedup=1e-9
    )
    checks = {c.name: c for c in evaluate(gates, bench, None, None)}
    pruned = next(r for r in rows if (r["backend"], r["batch"], r["model"]) == ("onnxruntime", 2, "pruned"))
    assert checks["max_image_ms"].measured == pytest.approx(pruned["median_ms"] / 2)
    assert "whole call" in checks["max_image_ms"].detail
    speedup = next(
        s for s in m["speedup"] if (s["backend"], s["what"], s["batch"]) == ("onnxruntime", "pipeline", 2)
    )
    assert checks["min_sampler_speedup"].measured == pytest.approx(speedup["speedup"])
    unet = next(
        s for s in m["speedup"] if (s["backend"], s["what"], s["batch"]) == ("onnxruntime", "unet", 2)
    )
    assert checks["min_speedup"].measured == pytest.approx(unet["speedup"])

    # another guidance scale reruns bench alone; at 1 the UNet is called on the batch itself
    cfg = _cfg(pipe, data, guidance=1.0, backends=["torch", "onnxruntime"])
    cfg.export.precisions = ["fp32"]
    again = run_pipeline(cfg, run, ["prune", "finetune", "export", "bench"])
    m1 = again["bench"]["metrics"]
    for stage in ("finetune", "export"):
        assert again[stage]["finished"] == first[stage]["finished"]
    assert [r["unet_batch"] for r in _rows(m1, "unet") if r["model"] == "dense"] == [1, 2, 1, 2]
    assert m1["conditioning"]["guided_unet_batch"] == "1x"


def test_a_class_conditioned_pixel_model_times_the_loop_alone(tmp_path):
    model = write_model_folder(tmp_path / "model", {**TINY_UNET, "num_class_embeds": 5})
    cfg = _cfg(model, class_tree(tmp_path / "classes", {"a": 4, "b": 4}), batch_sizes=[2])
    cfg.sample.prompts = ["1", "0"]
    m = run_pipeline(cfg, tmp_path / "run", STAGES)["bench"]["metrics"]
    whole = _rows(m, "pipeline")
    assert len(whole) == 2
    for row in whole:  # no text to encode, no latents to decode
        assert list(row["components"]) == ["unet_loop"] and row["components_on"] == {}
        assert row["components"]["unet_loop"] <= row["median_ms"] * 1.0001
    assert all(r["unet_batch"] == 4 and r["conditioning"] == "class" for r in _rows(m, "unet"))


def test_an_unconditional_run_writes_no_whole_call_rows(tmp_path):
    model = write_model_folder(tmp_path / "model")
    write_images(tmp_path / "images", 8, size=12)
    cfg = _cfg(model, tmp_path / "images", guidance=1.0, batch_sizes=[1])
    m = run_pipeline(cfg, tmp_path / "run", STAGES)["bench"]["metrics"]
    assert {r["what"] for r in m["results"]} == {"unet", "sampler"} and "conditioning" not in m
    keys = {"backend", "batch", "what", "variant", "scheduler", "steps", "cache_interval", "precision",
            "model", "median_ms", "p95_ms", "runs"}  # fmt: skip
    assert all(set(r) == keys for r in m["results"])
    assert not BenchMetrics(m["results"], m["speedup"]).whole_call


def test_the_whole_call_times_each_part_inside_one_call():
    """Parts that sleep known times: each is attributed to its component and they add up to the call."""

    def encode() -> Conditioning:
        time.sleep(0.03)
        return Conditioning("text", torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))

    def predict(x, t, encoder_hidden_states):
        time.sleep(0.01)
        assert x.shape[0] == encoder_hidden_states.shape[0] == 2  # one image, guided: 2 rows
        return torch.zeros_like(x)

    def decode(z):
        time.sleep(0.02)
        return z

    call = WholeCall(
        predict, make_scheduler("ddim", dict(DDPM_SCHEDULER)), torch.zeros(1, 1, 4, 4), 3, 2.0, encode, decode
    )
    start = time.perf_counter()
    call()
    total = (time.perf_counter() - start) * 1000
    parts = call.calls[-1]
    assert parts["text_encoder"] >= 30 and parts["unet_loop"] >= 30 and parts["vae_decoder"] >= 20
    assert parts["unet_loop"] < 30 + 25  # the decode is not counted in the loop
    assert sum(parts.values()) <= total
    call()
    assert call.component_ms(1) == call.calls[-1] and len(call.calls) == 2
    with pytest.raises(ValueError, match="give encode"):
        WholeCall(predict, None, torch.zeros(1, 1, 4, 4), 3, 2.0)


def test_the_whole_call_names_what_it_cannot_run(tmp_path, clip_tokenizer_folder, monkeypatch):
    pipe, _ = _text_pipeline(tmp_path, clip_tokenizer_folder)
    model = load_model(config_from_mapping({"model": {"name": str(pipe)}}).model, 0)
    run = tmp_path / "run"
    assert unavailable_reason(model, "torch", run) == ""
    assert "text_encoder.fp32.onnx is missing: rerun the export stage" in unavailable_reason(
        model, "onnxruntime", run
    )
    monkeypatch.setattr(tensorrt_backend, "unavailable_reason", lambda: "no CUDA device here")
    assert unavailable_reason(model, "tensorrt", run) == "no CUDA device here"
    monkeypatch.setattr(tensorrt_backend, "unavailable_reason", lambda: "")
    assert "text_encoder.plan is missing: rerun the build stage" in unavailable_reason(model, "tensorrt", run)
    assert "torch, onnxruntime, tensorrt only" in unavailable_reason(model, "openvino", run)


class FakeEngine:
    """A shared graph's TensorRT engine stood in for by the torch module it is built from."""

    def __init__(self, path: Path, model) -> None:
        self.part, self.model = path.stem, model

    def run(self, **feeds: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            if self.part == "text_encoder":
                assert feeds["input_ids"].dtype == torch.int64 and feeds["input_ids"].shape[1] == TOKENS
                return {"last_hidden_state": self.model.text_encoder(feeds["input_ids"])[0]}
            return {"sample": self.model.vae.decode(feeds["latent_sample"], return_dict=False)[0]}


def test_the_whole_call_on_tensorrt_runs_the_shared_engines(tmp_path, clip_tokenizer_folder, monkeypatch):
    """The text encoder and VAE decoder engines (``RUN/build/shared/``) take the tokenized prompts and
    the unscaled latents: with stand-ins computing what the engines were built from, the images equal
    the torch whole call's, and the calls built with one ``graphs`` dict share the engines."""
    pipe, _ = _text_pipeline(tmp_path, clip_tokenizer_folder)
    model = load_model(config_from_mapping({"model": {"name": str(pipe)}}).model, 0)
    run = tmp_path / "run"
    for part in ("text_encoder", "vae_decoder"):
        layout.shared_engine_path(run, part).parent.mkdir(parents=True, exist_ok=True)
        layout.shared_engine_path(run, part).write_bytes(b"engine")
    loaded = []
    monkeypatch.setattr(
        tensorrt_backend, "EngineRunner", lambda path: loaded.append(path) or FakeEngine(path, model)
    )
    monkeypatch.setattr(tensorrt_backend, "unavailable_reason", lambda: "")
    assert unavailable_reason(model, "tensorrt", run) == ""
    prompts = PromptSet("text", ("image 1", "image 2"), negative="blurry")
    predict = as_noise_predictor(model.unet)
    scheduler = make_scheduler("ddim", model.scheduler_config)
    graphs: dict = {}
    calls = {
        backend: whole_call(model, backend, predict, scheduler, prompts, 2, 3, 3.0, "cpu", run, graphs=graphs)
        for backend in ("torch", "tensorrt")
    }
    torch.testing.assert_close(calls["tensorrt"](), calls["torch"](), atol=1e-5, rtol=1e-5)
    assert [p.name for p in loaded] == ["text_encoder.plan", "vae_decoder.plan"]
    whole_call(model, "tensorrt", predict, scheduler, prompts, 1, 3, 3.0, "cpu", run, graphs=graphs)
    assert len(loaded) == 2  # the engines are loaded once for every call built with the same dict
    assert list(calls["tensorrt"].calls[-1]) == ["text_encoder", "unet_loop", "vae_decoder"]


def test_a_guided_students_whole_call_and_feature_reuse_are_timed(tmp_path, clip_tokenizer_folder):
    """A run ending in a guided model's 2-step student: its whole call samples the student's own
    schedule (one UNet call a step, the conditional half) against dense at the variant; variants that
    reuse features are timed as whole calls too, on the exported reuse passes with the prompts."""
    pipe, data = _text_pipeline(tmp_path, clip_tokenizer_folder)
    cfg = _cfg(pipe, data, backends=["onnxruntime"], batch_sizes=[2], variants=["ddim:4", "ddim:4:2"])
    cfg.distill_steps.target_steps, cfg.distill_steps.start_steps = 2, 4
    cfg.distill_steps.steps_per_round, cfg.distill_steps.batch_size = 2, 4
    cfg.export.feature_reuse, cfg.export.precisions = True, ["fp32"]
    m = run_pipeline(cfg, tmp_path / "run", ["prune", "distill_steps", "export", "bench"])["bench"]["metrics"]
    rows = _rows(m, "pipeline")
    assert {(r["variant"], r["model"]) for r in rows} == {
        (v, x) for v in ("ddim:4:1", "ddim:4:2") for x in ("dense", "pruned")
    }
    for row in rows:
        assert row["student_steps"] == 2 and row["cache_interval"] == int(row["variant"][-1])
        assert list(row["components"]) == ["text_encoder", "unet_loop", "vae_decoder"]
    assert not [k for k in m["skipped"] if "reuse" in k]
