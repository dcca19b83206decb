"""The stages after prune on conditional models: finetune on the encoded data with conditioning dropout,
samples with the run's prompts under guidance (latents decoded by the dense model's VAE), and the
prompts themselves (:mod:`compressor.prompts`)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor.config import DataConfig, SampleConfig
from compressor.errors import ConfigError, DataError, UserError
from compressor.prompts import PromptSet, read_prompt_file, run_prompts
from pipeline.runner import run_pipeline
from rundir import layout
from rundir.records import read_record
from tests.conftest import TINY_COND_UNET, TINY_UNET, conditional_config, write_model_folder

TOKENS = 6
WIDTH = TINY_COND_UNET["cross_attention_dim"]


def _cfg(model: Path, data: Path, extra: dict | None = None, **sample) -> object:
    sections = {"finetune": {"steps": 4, "cond_dropout": 0.5}, "sample": {"num_images": 4, **sample}}
    return conditional_config(model, data, **sections, **(extra or {}))


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory, clip_tokenizer_folder):
    """A tiny Stable-Diffusion-layout pipeline run through prune, finetune and samples: (pipeline
    folder, caption folder, run directory, records)."""
    from tests.test_components import write_pipeline
    from tests.test_conditioning_data import captioned

    root = tmp_path_factory.mktemp("sd-run")
    pipe = write_pipeline(root / "pipe", tokenizer=clip_tokenizer_folder(TOKENS))
    data = captioned(root / "images", 8)
    run = root / "run"
    return pipe, data, run, run_pipeline(_cfg(pipe, data), run, ["prune", "finetune", "samples"])


def test_a_text_to_image_pipeline_prunes_finetunes_and_samples_its_prompts(sd_run):
    pipe, data, run, records = sd_run
    ft = records["finetune"]["metrics"]
    assert math.isfinite(ft["eval_loss_ema"]) and math.isfinite(ft["eval_loss_raw"])
    assert len(ft["losses"]) == 4
    m = records["samples"]["metrics"]
    # the data's captions, cycled over the images (image i, prompt i mod 8)
    assert m["prompts"] == [f"image {i}" for i in range(4)] and m["guidance_scale"] == 3.0
    assert m["rows"] == ["dense", "pruned", "finetuned"]
    assert layout.prompt_pairs(run).is_file() and layout.samples_grid(run).is_file()
    # a rerun reuses every stage; a negative prompt changes the samples stage alone
    again = run_pipeline(_cfg(pipe, data, negative_prompt="blurry"), run, ["prune", "finetune", "samples"])
    assert again["finetune"]["finished"] == records["finetune"]["finished"]
    assert again["samples"]["metrics"]["negative_prompt"] == "blurry"


def test_the_sampler_and_the_sample_command_take_prompts(sd_run, tmp_path, capsys):
    from deploy.sampler import load_sampler
    from pipeline.cli import main

    _, _, run, _ = sd_run
    sampler = load_sampler(run)
    assert sampler.conditioning_kind == "text" and sampler.guidance_scale == 3.0  # the run's
    a = sampler(2, 3, prompts=["image 1", "image 2"])
    assert a.shape == (2, *sampler.output_shape) == (2, 3, 16, 16)  # decoded by the run's VAE
    assert torch.allclose(a[1:], sampler(1, 3, seed=1, prompts=["image 2"]), atol=1e-5)  # seed i, prompt i
    assert not torch.equal(a, sampler(2, 3, prompts=["image 1", "image 2"], guidance_scale=1.0))
    with pytest.raises(UserError, match="pass prompts"):
        sampler(1, 3)
    prompts = tmp_path / "p.txt"
    prompts.write_text("image 3\nimage 4\nimage 5\n")
    out = tmp_path / "three.npy"
    argv = ["sample", str(run), "--prompt", "image 1", "--prompt-file", str(prompts), "--steps", "3"]
    assert main([*argv, "--out", str(out)]) == 0
    assert "4 images for 4 prompts" in capsys.readouterr().out  # one image per prompt by default
    images = torch.from_numpy(np.load(out))
    assert torch.allclose(images, sampler(4, 3, prompts=["image 1", "image 3", "image 4", "image 5"]))
    assert main(["sample", str(run), "--steps", "3", "--out", str(tmp_path / "x.png")]) == 2
    assert "pass prompts" in capsys.readouterr().err and not (tmp_path / "x.png").exists()
    assert main([*argv[:4], "--prompt-file", str(tmp_path / "none.txt"), "--out", str(out)]) == 2


def test_a_text_to_image_run_ends_with_its_verdict_and_report(sd_run):
    """export, quality, parity, bench, check and report on the tiny run: the verdict reads the whole
    call and adherence, and the report shows both and the prompts side by side."""
    pipe, data, run, _ = sd_run
    small = {
        "quality": {"num_samples": 8, "steps": 3, "resamples": 20, "compare_pruned": False,
                    "compare_raw": False},
        "parity": {"batches": [1], "timesteps": [0, 999], "sampler_steps": 2, "sampler_images": 2},
        "bench": {"backends": ["onnxruntime"], "batch_sizes": [1], "sampler_steps": 2, "repeat": 3,
                  "sampler_repeat": 3, "warmup": 1},
        "export": {"precisions": ["fp32"]},
        "acceptance": {"backend": "onnxruntime", "batch": 1, "min_sampler_speedup": 0.01,
                       "max_parity_error": 1e-3},
    }  # fmt: skip
    stages = ["prune", "finetune", "samples", "export", "quality", "parity", "bench", "check", "report"]
    records = run_pipeline(_cfg(pipe, data, small), run, stages)
    checks = {c["name"]: c for c in records["check"]["metrics"]["checks"]}
    assert (
        "whole call" in checks["min_sampler_speedup"]["detail"]
        and checks["min_sampler_speedup"]["outcome"] == "pass"
    )
    report = (layout.report_dir(run) / "report.md").read_text()
    for part in ("text-to-image speed-up", "Latency: the whole text-to-image call", "ms by part",
                 "Each prompt, dense beside", "prompt -> image"):  # fmt: skip
        assert part in report, part
    assert (layout.report_dir(run) / "prompts.png").is_file()


def test_latency_probes_time_the_guided_call_with_its_conditioning(sd_run):
    """plan and prune.target_latency time a conditional UNet as the guided sampler calls it: with
    the prompts' embeddings, on twice the batch, its ONNX graph taking them as inputs."""
    from deploy.latency import latency_timer
    from pipeline.context import RunContext, StageCall

    pipe, data, run, _ = sd_run
    ctx = RunContext(_cfg(pipe, data), run).at_stage(StageCall("prune", "key"))
    inputs = ctx.timing_inputs(2)
    assert inputs["conditioning"].cond.shape == (2, TOKENS, WIDTH) and inputs["spec"].conditioning == "text"
    seen = []

    def predict(sample, timestep, **cond):
        seen.append((sample.shape[0], {k: tuple(v.shape) for k, v in cond.items()}))
        return sample

    timer = latency_timer(ctx.cfg, ctx.device, ctx.dense.scheduler_config, ctx.image_shape(), backend="torch",
                          batch=2, **inputs)  # fmt: skip
    assert "guided" in timer.describe() and timer.cache_facts()["conditioning"][2] == 3.0
    timer.probe._call(type("B", (), {"predict": staticmethod(predict)})(), ctx.image_shape())()
    assert seen == [(4, {"encoder_hidden_states": (4, TOKENS, WIDTH)})]  # 2 images, guided: 4 rows
    onnx_timer = latency_timer(ctx.cfg, ctx.device, ctx.dense.scheduler_config, ctx.image_shape(),
                               backend="onnxruntime", batch=2, repeat=3, **inputs)  # fmt: skip
    dense, pruned = onnx_timer.time(ctx.dense.unet, ctx.dense.unet, "same")
    assert dense > 0 and pruned > 0
    assert (
        "conditioning"
        not in latency_timer(
            ctx.cfg, ctx.device, ctx.dense.scheduler_config, ctx.image_shape(), backend="torch"
        ).cache_facts()
    )  # an unconditional probe's key is unchanged


def test_load_pipeline_generates_through_diffusers(sd_run):
    from diffusers import StableDiffusionPipeline

    from deploy.sampler import load_pipeline

    _, _, run, _ = sd_run
    pipe = load_pipeline(run)
    assert isinstance(pipe, StableDiffusionPipeline)
    out = pipe("image 1", num_inference_steps=3, guidance_scale=3.0, output_type="np",
               generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert out.shape == (1, 16, 16, 3) and np.isfinite(out).all()
    assert pipe.unet.conv_in.out_channels < 32  # the compressed UNet inside


def test_class_conditioned_pixel_models_sample_their_classes(tmp_path):
    from tests.test_conditioning_data import class_tree

    model = write_model_folder(tmp_path / "model", {**TINY_UNET, "num_class_embeds": 5})
    cfg = _cfg(model, class_tree(tmp_path / "classes", {"a": 4, "b": 4}), prompts=["1", "0"])
    run = tmp_path / "run"
    m = run_pipeline(cfg, run, ["prune", "finetune", "samples"])["samples"]["metrics"]
    assert m["prompts"] == ["1", "0", "1", "0"]
    assert read_record(run, "finetune").ok


def test_the_sampled_images_follow_the_prompt_and_guidance(tmp_path, clip_tokenizer_folder):
    """Same seeds: another prompt or another guidance scale changes the images, the same ones do not."""
    from compressor.models import as_noise_predictor
    from pipeline.context import RunContext, StageCall
    from tests.test_components import write_pipeline
    from tests.test_conditioning_data import captioned

    pipe = write_pipeline(tmp_path / "pipe", tokenizer=clip_tokenizer_folder(TOKENS))
    data = captioned(tmp_path / "images", 3)
    ctx = RunContext(_cfg(pipe, data), tmp_path / "run").at_stage(StageCall("samples", "key"))
    predict = as_noise_predictor(ctx.dense.unet)
    ctx.cfg.sample.guidance_scale = 5.0  # a config is a plain dataclass: one context per setting here
    a = ctx.sample_images(predict, 2, 3)
    assert a.shape == (2, *ctx.dense.image_shape) and 0 <= a.min() and a.max() <= 1  # decoded pixels
    assert torch.equal(a, ctx.sample_images(predict, 2, 3))
    other = PromptSet("text", ("something else",))
    assert not torch.allclose(a, ctx.sample_images(predict, 2, 3, prompts=other))
    ctx.cfg.sample.guidance_scale = 1.0
    assert not torch.allclose(a, ctx.sample_images(predict, 2, 3))


# -- the prompts ------------------------------------------------------------------------------------


def test_prompts_come_from_the_flag_the_config_the_file_or_the_data(tmp_path):
    digits = DataConfig(source="digits", max_images=40)
    shape = (1, 16, 16)
    found = run_prompts(SampleConfig(), digits, "text", shape)
    assert found.prompts[:3] == (
        "a handwritten digit zero",
        "a handwritten digit one",
        "a handwritten digit two",
    )
    assert len(found) == 10 and found.digits == list(range(10)) and found.source == "data.source=digits"
    assert found.for_images(3, start=9) == [
        "a handwritten digit nine",
        "a handwritten digit zero",
        "a handwritten digit one",
    ]
    file = tmp_path / "prompts.txt"
    file.write_text("a handwritten digit three\n\n  a cat  \n", encoding="utf-8")
    from_file = run_prompts(SampleConfig(prompt_file=str(file)), digits, "text", shape)
    assert from_file.prompts == ("a handwritten digit three", "a cat") and from_file.digits == [3, None]
    config = run_prompts(SampleConfig(prompts=["x"], prompt_file=str(file)), digits, "text", shape)
    assert config.prompts == ("x",)
    flag = run_prompts(SampleConfig(prompts=["x"]), digits, "text", shape, prompts=["y", "z"])
    assert flag.prompts == ("y", "z") and flag.source == "--prompt"
    classes = run_prompts(SampleConfig(), digits, "class", shape, num_classes=11)
    assert classes.prompts[:2] == ("0", "1") and classes.labels(3, start=9) == [9, 0, 1]


def test_bad_prompts_are_one_line_each(tmp_path):
    digits = DataConfig(source="digits", max_images=20)
    with pytest.raises(DataError, match="not found"):
        read_prompt_file(tmp_path / "missing.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_prompt_file(tmp_path / "latin1.txt")
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(DataError, match="holds no prompts"):
        read_prompt_file(tmp_path / "blank.txt")
    with pytest.raises(ConfigError, match="empty prompt"):
        run_prompts(SampleConfig(prompts=["a", " "]), digits, "text", (1, 16, 16))
    with pytest.raises(ConfigError, match="not a class index"):
        run_prompts(SampleConfig(prompts=["seven"]), digits, "class", (1, 16, 16), num_classes=11)
    with pytest.raises(ConfigError, match="outside the model's classes 0..9"):
        run_prompts(SampleConfig(prompts=["10"]), digits, "class", (1, 16, 16), num_classes=11)
