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

import pytest
import torch

from compressor.config import config_from_mapping
from compressor.guidance import encode_prompts, model_decoder
from compressor.models import as_noise_predictor, load_model
from compressor.sampling import denoise, initial_noise, make_scheduler
from deploy.runtimes import load_backend
from export.onnx_export import export_unet

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
