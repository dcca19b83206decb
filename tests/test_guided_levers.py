"""The levers under classifier-free guidance, proven over whole trajectories on a tiny Stable-Diffusion
-layout pipeline (tests.test_components.write_pipeline: UNet2DConditionModel, CLIP text encoder and
tokenizer, AutoencoderKL):

- solvers: DPM-Solver++ and UniPC in the product's loop (:func:`compressor.sampling.denoise`), on torch
  and on the exported ONNX graph through ONNX Runtime, against ``StableDiffusionPipeline`` from the same
  prompts, latents, steps and guidance;
- feature reuse (DeepCache) on the conditional UNet: both passes take the prompts' embeddings (or class
  labels), interval 1 is the plain guided sampler, the exported pass graphs equal torch's.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

from compressor.config import config_from_mapping
from compressor.errors import UserError
from compressor.feature_reuse import FeatureReuseUNet
from compressor.guidance import DISTILLED_GUIDANCE, encode_prompts, model_decoder
from compressor.models import ReusePredictor, as_noise_predictor, load_model
from compressor.persist import load_unet, read_structure, student_guidance, student_sampling
from compressor.sampling import denoise, initial_noise, make_scheduler
from deploy.runtimes import load_backend, onnxruntime_reuse_backend
from export.onnx_export import export_unet
from pipeline.context import RunContext, StageCall
from pipeline.runner import run_pipeline
from rundir import layout
from rundir.records import final_model_dir, read_record
from tests.conftest import conditional_config, text_to_image_folders

diffusers = pytest.importorskip("diffusers")

TOKENS = 8
PROMPTS = ["a handwritten digit seven", "a cat on a mat"]
NEGATIVE = "a dog on the moon"


@pytest.fixture(scope="module")
def sd(tmp_path_factory, clip_tokenizer_folder):
    """The tiny pipeline loaded as the product loads it, and its UNet's fp32 ONNX graph."""
    from tests.test_components import write_pipeline

    root = tmp_path_factory.mktemp("guided-levers")
    folder = write_pipeline(root / "pipe", tokenizer=clip_tokenizer_folder(TOKENS))
    model = load_model(config_from_mapping({"model": {"name": str(folder)}}).model)
    assert model.conditioning == "text" and model.latent
    onnx_path = root / "unet.fp32.onnx"
    export_unet(model.unet, onnx_path, spec=model.spec)
    return model, onnx_path


def _diffusers(model, kind: str, noise: torch.Tensor, steps: int, guidance: float) -> torch.Tensor:
    pipe = diffusers.StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
        scheduler=make_scheduler(kind, model.scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    with torch.no_grad():
        out = pipe(
            PROMPTS, negative_prompt=[NEGATIVE] * len(PROMPTS), num_inference_steps=steps,
            guidance_scale=guidance, latents=noise.clone(), output_type="pt",
        )  # fmt: skip
    return out.images


@pytest.mark.parametrize("kind", ["dpmsolver++", "unipc"])
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_multistep_solvers_under_guidance_equal_stable_diffusion_pipeline(sd, kind, backend):
    model, onnx_path = sd
    steps, guidance = 6, 4.0
    noise = initial_noise(model.sample_shape, [3, 4])
    predict = (
        as_noise_predictor(model.unet)
        if backend == "torch"
        else load_backend("onnxruntime", file=onnx_path, threads=1).predict
    )
    calls: list[int] = []

    def counted(sample, timestep, **cond):
        calls.append(sample.shape[0])
        assert cond["encoder_hidden_states"].shape[0] == sample.shape[0]
        return predict(sample, timestep, **cond)

    ours = denoise(
        counted, make_scheduler(kind, model.scheduler_config), noise, steps,
        conditioning=encode_prompts(model, PROMPTS, NEGATIVE), guidance_scale=guidance,
        decode=model_decoder(model),
    )  # fmt: skip
    theirs = _diffusers(model, kind, noise, steps, guidance)
    assert calls == [4] * steps  # one call a step on both halves (twice the two images)
    assert ours.shape == theirs.shape == (2, 3, 16, 16)
    tolerance = 1e-5 if backend == "torch" else 1e-4
    assert float((ours - theirs).abs().max()) < tolerance
    other = _diffusers(model, "ddim", noise, steps, guidance)
    assert float((ours - other).abs().max()) > 1e-3  # the solver matters: the check can fail


# -- feature reuse (DeepCache) on the conditional UNet --------------------------------------------


def _guided_inputs(model, batch: int = 2):
    cond = encode_prompts(model, PROMPTS[:batch], NEGATIVE)
    x = initial_noise(model.sample_shape, list(range(2 * batch)))
    t = torch.full((2 * batch,), 700, dtype=torch.long)
    return x, t, cond.inputs(True)


def test_both_passes_take_the_prompts_and_the_full_pass_is_the_unet(sd):
    model, _ = sd
    split = FeatureReuseUNet(model.unet, 0)
    x, t, given = _guided_inputs(model)
    with torch.no_grad():
        plain = model.unet(x, t, **given).sample
        noise, feature = split.full(x, t, **given)
        shallow = split.shallow(x, t, feature, **given)
        unprompted = split.full(x, t)[0]  # the null context: another prediction
    assert float((noise - plain).abs().max()) < 1e-5
    assert float((shallow - plain).abs().max()) < 1e-5  # its own step's feature: the UNet again
    assert float((unprompted - plain).abs().max()) > 1e-3


def test_class_conditional_passes_embed_the_labels():
    from compressor.models import build_unet
    from tests.conftest import TINY_UNET

    unet = build_unet({**TINY_UNET, "num_class_embeds": 5}, 0).eval()
    split = FeatureReuseUNet(unet, 0)
    x, t, labels = torch.randn(4, 3, 16, 16), torch.full((4,), 300), torch.tensor([4, 4, 0, 3])
    with torch.no_grad():
        plain = unet(x, t, class_labels=labels).sample
        noise, feature = split.full(x, t, class_labels=labels)
        shallow = split.shallow(x, t, feature, class_labels=labels)
    assert float((noise - plain).abs().max()) < 1e-5 and float((shallow - plain).abs().max()) < 1e-5


def _reuse_images(model, predict, interval: int) -> tuple[torch.Tensor, list]:
    """Guided DPM-Solver++ 6 of the two prompts through ``predict`` (a ReusePredictor) at ``interval``;
    the images and each UNet pass run (its name and rows)."""
    calls: list[tuple[str, int]] = []

    def full(x, t, **cond):
        calls.append(("full", x.shape[0]))
        return predict.full(x, t, **cond)

    def shallow(x, t, feature, **cond):
        calls.append(("shallow", x.shape[0]))
        assert feature.shape[0] == x.shape[0] == cond["encoder_hidden_states"].shape[0]
        return predict.shallow(x, t, feature, **cond)

    images = denoise(
        ReusePredictor(full, shallow, 0), make_scheduler("dpmsolver++", model.scheduler_config),
        initial_noise(model.sample_shape, [3, 4]), 6, cache_interval=interval,
        conditioning=encode_prompts(model, PROMPTS, NEGATIVE), guidance_scale=4.0,
        decode=model_decoder(model),
    )  # fmt: skip
    return images, calls


def test_guided_feature_reuse_on_torch_and_onnx_runtime(sd, tmp_path):
    model, _ = sd
    torch_reuse = load_backend("torch", unet=model.unet, cache_level=0).predict
    every, calls = _reuse_images(model, torch_reuse, 1)
    assert calls == [("full", 4)] * 6
    plain = denoise(
        as_noise_predictor(model.unet), make_scheduler("dpmsolver++", model.scheduler_config),
        initial_noise(model.sample_shape, [3, 4]), 6, conditioning=encode_prompts(model, PROMPTS, NEGATIVE),
        guidance_scale=4.0, decode=model_decoder(model),
    )  # fmt: skip
    assert float((every - plain).abs().max()) < 1e-5  # interval 1 is the plain guided sampler
    reused, calls = _reuse_images(model, torch_reuse, 2)
    assert calls == [("full", 4), ("shallow", 4)] * 3  # both halves in each pass, at twice the batch
    assert 0 < float((reused - plain).abs().max()) < 0.5
    # the two passes exported with the prompts' embeddings, run by ONNX Runtime
    paths = {}
    for part in ("full", "shallow"):
        paths[part] = tmp_path / f"unet-{part}-l0.fp32.onnx"
        export_unet(model.unet, paths[part], part=part, level=0, spec=model.spec)
    assert [i.name for i in onnx.load(str(paths["full"])).graph.input] == [
        "sample", "timestep", "encoder_hidden_states"
    ]  # fmt: skip
    assert [i.name for i in onnx.load(str(paths["shallow"])).graph.input] == [
        "sample", "timestep", "encoder_hidden_states", "feature"
    ]  # fmt: skip
    ort = onnxruntime_reuse_backend(paths["full"], paths["shallow"], 0, threads=1)
    assert ort.info["conditioning"] == ["encoder_hidden_states"]
    on_ort, calls = _reuse_images(model, ort.predict, 2)
    assert calls == [("full", 4), ("shallow", 4)] * 3
    assert float((on_ort - reused).abs().max()) < 1e-4
    x, t, given = _guided_inputs(model)
    with pytest.raises(UserError, match="needs encoder_hidden_states"):
        ort.predict.full(x, t)


# -- few-step students of a guided model (guided progressive distillation at a fixed scale) --------


@pytest.fixture(scope="module")
def student_run(tmp_path_factory, clip_tokenizer_folder) -> tuple[Path, object]:
    """A tiny text-to-image run's 2-step student of its pruned model: guidance 3 distilled at 8 steps,
    then 8 -> 4 -> 2."""
    root = tmp_path_factory.mktemp("guided-student")
    pipe, data = text_to_image_folders(root, clip_tokenizer_folder)
    distill = {"target_steps": 2, "start_steps": 8, "steps_per_round": 2, "batch_size": 4,
               "checkpoint_every": 2, "log_every": 1}  # fmt: skip
    run, cfg = root / "run", conditional_config(pipe, data, distill_steps=distill)
    run_pipeline(cfg, run, ["prune", "distill_steps"])
    return run, cfg


def test_a_guided_models_student_records_its_distilled_scale(student_run):
    student_run = student_run[0]
    metrics = read_record(student_run, "distill_steps").metrics
    assert metrics["guidance"] == {
        "distilled_scale": 3.0,
        "unet_calls_per_step": 1,
        "sampled_guidance_scale": 1.0,
    }
    first, *halving = metrics["rounds"]
    assert (first["steps"], first["teacher_steps"], first["guidance_scale"]) == (8, 8, 3.0)  # stage one
    assert [(r["steps"], r["teacher_steps"]) for r in halving] == [(4, 8), (2, 4)]
    assert all("guidance_scale" not in r and r["optimizer_steps"] == 2 for r in halving)
    assert all(r["mse_vs_teacher"] >= 0 for r in metrics["rounds"])
    final = layout.model_dir(student_run, "distill_steps")
    assert final_model_dir(student_run) == ("distill_steps", final)
    sched_cfg, steps = student_sampling(final)
    assert steps == 2 and sched_cfg[DISTILLED_GUIDANCE] == 3.0 and sched_cfg["timestep_spacing"] == "trailing"
    assert read_structure(final)["guidance"]["distilled_scale"] == 3.0
    assert student_guidance(final) == 3.0 and student_guidance(layout.model_dir(student_run, "prune")) is None
    for n in (8, 4, 2):  # every round's student, stage one's at the teacher's 8 steps
        assert student_sampling(layout.student_round_dir(student_run, n))[1] == n


def test_the_student_is_sampled_once_a_step_on_the_conditional_half(student_run):
    student_run, cfg = student_run
    ctx = RunContext(cfg, student_run).at_stage(StageCall("samples", ""))  # as the samples stage samples
    final = layout.model_dir(student_run, "distill_steps")
    unet = load_unet(final)[0]
    calls: list[int] = []

    def counted(sample, timestep, **cond):
        calls.append(sample.shape[0])
        assert cond["encoder_hidden_states"].shape[0] == sample.shape[0]
        return as_noise_predictor(unet)(sample, timestep, **cond)

    images = ctx.sample_images(counted, 2, 50, student=student_sampling(final))
    assert calls == [2, 2]  # the student's 2 steps, the images' batch (2): no guidance doubling
    assert images.shape == (2, 3, 16, 16) and 0 <= float(images.min()) <= float(images.max()) <= 1
    calls.clear()
    ctx.sample_images(counted, 2, 2)  # the same UNet as a plain model of the run: guided, twice the rows
    assert calls == [4, 4]


def test_stage_one_regresses_the_guided_teacher_from_the_conditional_half():
    from compressor.conditional_batches import NullCondition
    from compressor.models import build_unet
    from compressor.step_distill import GuidedTarget
    from tests.conftest import DDPM_SCHEDULER, TINY_COND_UNET

    teacher = build_unet(TINY_COND_UNET, 0).eval()
    abar = make_scheduler("ddpm", DDPM_SCHEDULER).alphas_cumprod
    null = NullCondition(text=torch.randn(1, 6, 16))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t, text = torch.tensor([10, 500, 999]), torch.randn(3, 6, 16, generator=g)
    target = GuidedTarget(teacher, abar, 3.0, null, "epsilon", "epsilon")

    class Guided(torch.nn.Module):  # answers with the teacher guided against the null text, by hand
        def forward(self, z, tt, return_dict=False, encoder_hidden_states=None):
            both = torch.cat([null.text.expand_as(encoder_hidden_states), encoder_hidden_states])
            uncond, cond = teacher(torch.cat([z, z]), torch.cat([tt, tt]), both).sample.chunk(2)
            return (uncond + 3.0 * (cond - uncond),)

    with torch.no_grad():
        assert float(target(Guided(), x0, noise, t, encoder_hidden_states=text)) < 1e-10
        assert float(target(teacher, x0, noise, t, encoder_hidden_states=text)) > 1e-4  # unguided: off


def test_the_students_cache_key_holds_the_distilled_scale(student_run):
    import dataclasses

    from pipeline.cache import stage_key
    from pipeline.stages import distill_steps

    run, cfg = student_run
    other = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, guidance_scale=5.0))
    keys = [stage_key(RunContext(c, run), "distill_steps", distill_steps)["key"] for c in (cfg, other)]
    assert keys[0] != keys[1]  # another scale is another student: trained again, not reused
    assert distill_steps.key_extra(RunContext(cfg, run))["sample.guidance_scale"] == 3.0
