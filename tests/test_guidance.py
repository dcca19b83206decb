"""Conditional sampling in the product's own loop (compressor/guidance.py, compressor/sampling.py) proven
against diffusers: a tiny text-conditioned latent pipeline (UNet2DConditionModel, the project's frozen
CLIP text encoder and byte-level BPE tokenizer, AutoencoderKL) equals ``StableDiffusionPipeline`` from
the same initial latents, with and without classifier-free guidance; a class-conditional UNet2DModel
equals a reference loop written out here; ``deploy.sampler.load_pipeline`` puts a run's compressed UNet
in the diffusers pipeline for its model. Everything is built from configs into tmp_path (never a
download)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from compressor.clip_text import frozen_text_encoder
from compressor.components import DiffusionModel
from compressor.config import config_from_mapping
from compressor.errors import ConfigError, ModelError
from compressor.guidance import Conditioning, class_conditioning, encode_prompts, model_decoder
from compressor.models import as_noise_predictor, build_unet, load_model
from compressor.persist import dense_config, load_unet, save_unet
from compressor.sampling import denoise, generate, initial_noise, make_scheduler
from deploy.sampler import diffusers_pipeline, load_pipeline
from rundir import layout
from tests.conftest import DDPM_SCHEDULER, SD_INDEX, TINY_COND_UNET, TINY_UNET, TINY_VAE, finished_tiny_run

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

TOKENS = 16  # the tokenizer's model_max_length: the text conditioning's sequence length
# Stable Diffusion v1's schedule (its scheduler_config.json, PNDM's keys dropped by make_scheduler)
SD_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
}
PROMPTS = ["a cat", "a dog on the moon, painted in oil with far too many words for sixteen tokens"]


def write_sd_pipeline(root: Path, tokenizer_folder: Path) -> Path:
    """A tiny Stable-Diffusion-layout pipeline folder: the project's CLIP tokenizer (its files as
    train_clip_tokenizer saved them) and frozen text encoder, the rest written with save_pretrained."""
    from diffusers import AutoencoderKL

    shutil.copytree(tokenizer_folder, root / "tokenizer")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
    hidden = TINY_COND_UNET["cross_attention_dim"]
    encoder = frozen_text_encoder(
        tokenizer, hidden_size=hidden, layers=1, heads=2, intermediate_size=32, seed=1
    )
    encoder.save_pretrained(str(root / "text_encoder"))
    torch.manual_seed(2)
    AutoencoderKL.from_config(TINY_VAE).save_pretrained(str(root / "vae"), safe_serialization=True)
    build_unet(TINY_COND_UNET, 0).save_pretrained(str(root / "unet"), safe_serialization=True)
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD_SCHEDULER))
    (root / "model_index.json").write_text(json.dumps(SD_INDEX))
    return root


def _model_config(name: Path):
    return config_from_mapping({"model": {"name": str(name), "init": "pretrained"}}).model


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory, clip_tokenizer_folder) -> Path:
    return write_sd_pipeline(tmp_path_factory.mktemp("tiny-sd"), clip_tokenizer_folder(TOKENS))


@pytest.fixture(scope="module")
def sd_model(sd_folder) -> DiffusionModel:
    model = load_model(_model_config(sd_folder))
    assert model.conditioning == "text" and model.latent and model.sample_shape == (4, 8, 8)
    return model


def sd_pipeline(model: DiffusionModel, scheduler, unet=None):
    return diffusers.StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=unet or model.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def _diffusers_images(pipe, noise, steps, guidance, negative) -> torch.Tensor:
    negatives = None if negative is None else [negative] * len(PROMPTS)
    with torch.no_grad():
        out = pipe(
            PROMPTS, negative_prompt=negatives, num_inference_steps=steps, guidance_scale=guidance,
            latents=noise.clone(), output_type="pt",
        )  # fmt: skip
    return out.images


def _product_images(model, unet, kind, noise, steps, guidance, negative) -> torch.Tensor:
    cond = encode_prompts(model, PROMPTS, negative or "")
    sched = make_scheduler(kind, model.scheduler_config)
    return denoise(
        as_noise_predictor(unet), sched, noise, steps, conditioning=cond, guidance_scale=guidance,
        decode=model_decoder(model),
    )  # fmt: skip


# -- the text-conditioned latent loop against StableDiffusionPipeline ------------------------------


def test_the_projects_tokenizer_is_a_real_byte_level_bpe(sd_model):
    ids = sd_model.tokenizer(PROMPTS, padding="max_length", max_length=TOKENS, truncation=True).input_ids
    words = sd_model.tokenizer.convert_ids_to_tokens(ids[0])
    assert words[:4] == ["<|startoftext|>", "a</w>", "cat</w>", "<|endoftext|>"]
    assert len(ids[1]) == TOKENS and ids[1][-1] == sd_model.tokenizer.eos_token_id  # truncated, closed
    assert len(set(ids[1])) > 8  # distinct tokens, not one unknown id


@pytest.mark.parametrize(
    ("kind", "steps", "guidance", "negative"),
    [
        ("ddim", 3, 1.0, None),
        ("ddim", 3, 3.0, None),
        ("ddim", 3, 3.0, "blurry, low quality"),
        ("ddim", 3, 1.0, "blurry, low quality"),  # no guidance: the negative prompt is not used
        ("dpmsolver++", 4, 1.0, None),
        ("dpmsolver++", 4, 3.0, "blurry, low quality"),
        ("ddim", 3, 0.5, None),  # <= 1: diffusers skips guidance, the loop too
    ],
)
def test_the_loop_equals_stable_diffusion_pipeline(sd_model, kind, steps, guidance, negative):
    noise = initial_noise(sd_model.sample_shape, [0, 1])
    pipe = sd_pipeline(sd_model, make_scheduler(kind, sd_model.scheduler_config))
    ours = _product_images(sd_model, sd_model.unet, kind, noise, steps, guidance, negative)
    theirs = _diffusers_images(pipe, noise, steps, guidance, negative)
    assert pipe.do_classifier_free_guidance is (guidance > 1)  # what the pipeline did
    assert ours.shape == theirs.shape == (2, 3, 16, 16)
    assert float((ours - theirs).abs().max()) < 1e-5


def test_guidance_changes_the_images_and_the_prompt_matters(sd_model):
    noise = initial_noise(sd_model.sample_shape, [0, 1])
    plain = _product_images(sd_model, sd_model.unet, "ddim", noise, 3, 1.0, None)
    guided = _product_images(sd_model, sd_model.unet, "ddim", noise, 3, 3.0, None)
    negative = _product_images(sd_model, sd_model.unet, "ddim", noise, 3, 3.0, "blurry")
    below_one = _product_images(sd_model, sd_model.unet, "ddim", noise, 3, 0.5, "blurry")
    assert float((plain - guided).abs().max()) > 1e-4
    assert float((guided - negative).abs().max()) > 1e-4
    assert torch.equal(plain, below_one)


def test_generate_batches_the_conditioning_with_the_seeds(sd_model):
    prompts = ["a cat", "a dog", "on the moon"]
    cond = encode_prompts(sd_model, prompts, "blurry")
    sched = make_scheduler("ddim", sd_model.scheduler_config)
    predict, decode = as_noise_predictor(sd_model.unet), model_decoder(sd_model)
    kw = {"conditioning": cond, "guidance_scale": 2.0, "decode": decode}
    batched = generate(predict, sched, sd_model.sample_shape, 3, 3, seed=5, batch_size=2, **kw)
    whole = denoise(predict, sched, initial_noise(sd_model.sample_shape, [5, 6, 7]), 3, seeds=[5, 6, 7], **kw)
    assert batched.shape == (3, 3, 16, 16)
    assert torch.allclose(batched, whole, atol=1e-5)
    with pytest.raises(ConfigError, match="conditioning for 3 images given for 4 images"):
        generate(predict, sched, sd_model.sample_shape, 4, 3, **kw)


def test_encode_prompts_is_the_pipelines_encoding(sd_model):
    pipe = sd_pipeline(sd_model, make_scheduler("ddim", sd_model.scheduler_config))
    cond = encode_prompts(sd_model, PROMPTS, ["", "ugly"])
    embeds, negatives = pipe.encode_prompt(PROMPTS, "cpu", 1, True, ["", "ugly"])
    assert cond.kind == "text" and cond.input_name == "encoder_hidden_states"
    assert cond.cond.shape == (2, TOKENS, TINY_COND_UNET["cross_attention_dim"])
    assert torch.equal(cond.cond, embeds) and torch.equal(cond.uncond, negatives)
    default = encode_prompts(sd_model, "a cat")  # one string, the empty negative prompt
    assert len(default) == 1 and torch.equal(default.uncond, encode_prompts(sd_model, "").cond)
    with pytest.raises(ConfigError, match="2 negative prompts for 3 prompts"):
        encode_prompts(sd_model, ["a", "b", "c"], ["x", "y"])
    with pytest.raises(ConfigError, match="no prompts"):
        encode_prompts(sd_model, [])


# -- class conditioning ------------------------------------------------------------------------------


CLASSES = 5  # four classes and the null class (the table's last row)


@pytest.fixture(scope="module")
def class_model() -> DiffusionModel:
    return DiffusionModel(
        build_unet({**TINY_UNET, "num_class_embeds": CLASSES}, 0).eval(), dict(DDPM_SCHEDULER)
    )


def _reference_class_loop(unet, noise, labels, null, steps, scale) -> torch.Tensor:
    """Classifier-free guidance over class labels written out: one UNet call on both halves a step."""
    sched = make_scheduler("ddim", DDPM_SCHEDULER)
    sched.set_timesteps(steps)
    x = noise.clone()
    both = torch.cat([torch.full_like(labels, null), labels])
    for t in sched.timesteps:
        with torch.no_grad():
            if scale > 1:
                uncond, cond = unet(torch.cat([x, x]), t, class_labels=both).sample.chunk(2)
                eps = uncond + scale * (cond - uncond)
            else:
                eps = unet(x, t, class_labels=labels).sample
        x = sched.step(eps, t, x).prev_sample
    return (x / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_class_guidance_equals_the_reference_loop(class_model, scale):
    cond = class_conditioning(class_model, [0, 3, 1])
    assert cond.kind == "class" and cond.uncond.tolist() == [CLASSES - 1] * 3  # the table's last row
    noise = initial_noise(class_model.sample_shape, [0, 1, 2])
    sched = make_scheduler("ddim", class_model.scheduler_config)
    ours = denoise(
        as_noise_predictor(class_model.unet), sched, noise, 3, conditioning=cond, guidance_scale=scale
    )
    reference = _reference_class_loop(class_model.unet, noise, cond.cond, CLASSES - 1, 3, scale)
    assert float((ours - reference).abs().max()) < 1e-5


def test_class_labels_and_the_null_class_are_checked(class_model, tiny_unet):
    assert class_conditioning(class_model, 2, null_class=0).uncond.tolist() == [0]
    with pytest.raises(ConfigError, match="label 5: the UNet has 5 class embeddings"):
        class_conditioning(class_model, [1, 5])
    with pytest.raises(ConfigError, match="null_class -1"):
        class_conditioning(class_model, [1], null_class=-1)
    with pytest.raises(ModelError, match="no class embeddings"):
        class_conditioning(DiffusionModel(tiny_unet, dict(DDPM_SCHEDULER)), [0])
    with pytest.raises(ModelError, match="no text encoder"):
        encode_prompts(class_model, "a cat")


# -- the loop's rules ---------------------------------------------------------------------------------


def test_unconditional_calls_are_unchanged_and_misuse_is_refused(tiny_unet, class_model):
    predict, noise = as_noise_predictor(tiny_unet), initial_noise((3, 16, 16), [0, 1])
    sched = make_scheduler("ddim", DDPM_SCHEDULER)
    plain = denoise(predict, sched, noise, 2)
    assert torch.equal(plain, denoise(predict, sched, noise, 2, conditioning=None, guidance_scale=1.0))
    with pytest.raises(ConfigError, match="guidance_scale=3.0 needs conditioning"):
        denoise(predict, sched, noise, 2, guidance_scale=3.0)
    with pytest.raises(ConfigError, match="finite number >= 0"):
        denoise(predict, sched, noise, 2, guidance_scale=float("nan"))
    cond = class_conditioning(class_model, [0, 1])
    class_predict = as_noise_predictor(class_model.unet)
    with pytest.raises(ConfigError, match="needs a backend built for feature reuse"):  # reuse is no refusal
        denoise(class_predict, sched, noise, 4, cache_interval=2, conditioning=cond, guidance_scale=2.0)
    with pytest.raises(ConfigError, match="conditioning for 2 images given for a batch of 1"):
        denoise(class_predict, sched, noise[:1], 2, conditioning=cond)
    with pytest.raises(ConfigError, match="shapes differ"):
        Conditioning("class", torch.tensor([0, 1]), torch.tensor([4]))
    with pytest.raises(ConfigError, match="integer class labels"):
        Conditioning("class", torch.tensor([0.0]), torch.tensor([4.0]))


# -- load_pipeline: the run's compressed UNet in diffusers ---------------------------------------------


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory) -> Path:
    return finished_tiny_run(tmp_path_factory.mktemp("uncond"), "prune")[1]


def test_load_pipeline_of_an_unconditional_run_samples_like_the_loop(pruned_run):
    pipe = load_pipeline(pruned_run)
    assert isinstance(pipe, diffusers.DDIMPipeline)
    final, meta = load_unet(layout.model_dir(pruned_run, "prune"))
    saved = final.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in pipe.unet.state_dict().items())
    shape = (2, final.config.in_channels, final.config.sample_size, final.config.sample_size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))  # DDIMPipeline's draw
    with torch.no_grad():
        images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=3,
                      output_type="np").images  # fmt: skip
    ours = denoise(as_noise_predictor(final), make_scheduler("ddim", meta["scheduler_config"]), noise, 3)
    assert float((torch.from_numpy(images).permute(0, 3, 1, 2) - ours).abs().max()) < 1e-5
    other = load_pipeline(pruned_run, scheduler="dpmsolver++")
    assert isinstance(other, diffusers.DDPMPipeline)
    assert type(other.scheduler).__name__ == "DPMSolverMultistepScheduler"


def _write_run(run: Path, model_folder: Path, unet) -> None:
    """A run directory as the prune stage leaves it: its record naming the model, the compressed UNet."""
    record = {"stage": "prune", "status": "ok", "reason": "", "metrics": {},
              "config": {"model": {"name": str(model_folder), "init": "pretrained"}, "seed": 0}}  # fmt: skip
    path = layout.record_path(run, "prune")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    extra = {
        "scheduler_config": json.loads((model_folder / "scheduler" / "scheduler_config.json").read_text())
    }
    save_unet(unet, layout.model_dir(run, "prune"), dense_config(unet), extra=extra)


def test_load_pipeline_of_a_text_conditioned_run_is_stable_diffusion(sd_folder, sd_model, tmp_path):
    compressed = build_unet(TINY_COND_UNET, 0).eval()
    with torch.no_grad():  # a "compressed" UNet: other weights than the dense model's
        for p in compressed.parameters():
            p.mul_(0.9)
    run = tmp_path / "run"
    _write_run(run, sd_folder, compressed)
    pipe = load_pipeline(run, scheduler="dpmsolver++")
    assert isinstance(pipe, diffusers.StableDiffusionPipeline)
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert all(torch.equal(v, compressed.state_dict()[k]) for k, v in pipe.unet.state_dict().items())
    noise = initial_noise(sd_model.sample_shape, [0, 1])
    theirs = _diffusers_images(pipe, noise, 4, 3.0, "blurry")
    ours = _product_images(sd_model, compressed, "dpmsolver++", noise, 4, 3.0, "blurry")
    dense = _product_images(sd_model, sd_model.unet, "dpmsolver++", noise, 4, 3.0, "blurry")
    assert float((ours - theirs).abs().max()) < 1e-5
    assert float((dense - theirs).abs().max()) > 1e-4  # the run's UNet, not the dense one


def test_models_without_a_diffusers_pipeline_are_refused(class_model, tiny_cond_unet):
    sched = make_scheduler("ddim", DDPM_SCHEDULER)
    with pytest.raises(ModelError, match="no pipeline for class conditioning"):
        diffusers_pipeline(class_model.unet, class_model, sched)
    null_context = DiffusionModel(tiny_cond_unet, dict(DDPM_SCHEDULER))
    with pytest.raises(ModelError, match="UNet2DConditionModel without text"):
        diffusers_pipeline(tiny_cond_unet, null_context, sched)


def test_an_unconditional_latent_model_goes_in_ldm_pipeline(sd_model):
    latent_unet = build_unet({**TINY_UNET, "in_channels": 4, "out_channels": 4, "sample_size": 8}, 0).eval()
    dense = DiffusionModel(latent_unet, dict(SD_SCHEDULER), vae=sd_model.vae)
    pipe = diffusers_pipeline(latent_unet, dense, make_scheduler("ddim", SD_SCHEDULER))
    assert isinstance(pipe, diffusers.LDMPipeline)
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))  # LDMPipeline's draw
    with torch.no_grad():
        images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=3,
                      output_type="np").images  # fmt: skip
    sched = make_scheduler("ddim", SD_SCHEDULER)
    ours = denoise(as_noise_predictor(latent_unet), sched, noise, 3, decode=model_decoder(dense))
    assert ours.shape == (2, 3, 16, 16)
    assert float((torch.from_numpy(images).permute(0, 3, 1, 2) - ours).abs().max()) < 1e-5
