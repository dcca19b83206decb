"""Text to image on ONNX Runtime alone, and its parity with torch from the same prompt and seed.

The three graphs of :mod:`export.pipeline_graphs` and :func:`export.onnx_export.export_unet`:
the prompts are tokenized (the model's tokenizer, padded to its ``model_max_length``, as
``StableDiffusionPipeline.encode_prompt`` does) and encoded by the text encoder graph, the
product's sampling loop (:func:`compressor.sampling.denoise`) guides the UNet graph through the
ONNX Runtime backend (``load_backend("onnxruntime", file=...)``, conditioning by keyword), and
the final latents are unscaled here (:func:`export.pipeline_graphs.unscale_latents`: ``/
scaling_factor``) and decoded by the VAE decoder graph.

:func:`text_to_image_parity` runs that and the torch pipeline (:func:`compressor.guidance.encode_prompts`,
the torch UNet, :func:`compressor.guidance.model_decoder`) on the same prompts and initial noise
and reports the PSNR of the decoded images (in [0, 1]) and their largest absolute difference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from compressor.components import DiffusionModel
from compressor.errors import ModelError
from compressor.guidance import Conditioning, encode_prompts, model_decoder
from compressor.models import as_noise_predictor
from compressor.sampling import denoise, initial_noise, make_scheduler
from deploy.runtimes import graph_session, load_backend
from export.pipeline_graphs import TEXT_ENCODER, VAE_DECODER, unscale_latents


def onnx_text_encoder(
    path: Path, tokenizer, threads: int | None = None
) -> Callable[[list[str]], torch.Tensor]:
    """``texts -> last_hidden_state`` (B x tokens x D) through the exported text encoder; the texts
    tokenized as Stable Diffusion does (padded to the tokenizer's ``model_max_length``, truncated)."""
    session = graph_session(Path(path), TEXT_ENCODER, threads)

    def encode(texts: list[str]) -> torch.Tensor:
        ids = tokenizer(
            texts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="np",
        ).input_ids
        return torch.from_numpy(session.run(["last_hidden_state"], {"input_ids": ids.astype("int64")})[0])

    return encode


def onnx_prompt_conditioning(
    encode: Callable[[list[str]], torch.Tensor], prompts: Sequence[str], negative_prompt: str = ""
) -> Conditioning:
    """The text conditioning of ``prompts`` (one image each) and of the negative prompt, encoded by
    ``encode`` (:func:`onnx_text_encoder`)."""
    texts = list(prompts)
    return Conditioning("text", encode(texts), encode([negative_prompt] * len(texts)))


def onnx_vae_decoder(
    path: Path, vae_config, threads: int | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``latents -> images in [-1, 1]`` through the exported VAE decoder: the sampler's latents are
    unscaled here (``/ scaling_factor``, + ``shift_factor``), then decoded by the graph."""
    session = graph_session(Path(path), VAE_DECODER, threads)

    def decode(latents: torch.Tensor) -> torch.Tensor:
        z = unscale_latents(latents, vae_config).cpu().numpy()
        return torch.from_numpy(session.run(["sample"], {"latent_sample": z})[0])

    return decode


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two image batches in [0, 1] (inf when they are equal)."""
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def text_to_image_parity(
    model: DiffusionModel,
    unet_path: Path,
    text_encoder_path: Path,
    vae_decoder_path: Path,
    prompts: Sequence[str],
    *,
    unet: nn.Module | None = None,
    negative_prompt: str = "",
    seed: int = 0,
    steps: int = 10,
    guidance_scale: float = 7.5,
    scheduler: str = "ddim",
    threads: int | None = None,
) -> dict:
    """The same prompts and seed through torch and through ONNX Runtime (text encoder graph -> UNet
    graph with classifier-free guidance -> VAE decoder graph); returns ``psnr`` (dB) and
    ``max_abs_error`` of the images in [0, 1], and both image batches (``torch``, ``onnx``).

    ``unet``: the torch UNet the UNet graph was exported from (default ``model.unet``). ModelError
    for a model that is not text-to-image (no text encoder, tokenizer or VAE)."""
    if model.text_encoder is None or model.tokenizer is None or model.vae is None:
        raise ModelError("text_to_image_parity: the model needs a text encoder, a tokenizer and a VAE")
    prompts = list(prompts)
    seeds = list(range(seed, seed + len(prompts)))
    noise = initial_noise(model.sample_shape, seeds)
    sched = make_scheduler(scheduler, model.scheduler_config)
    common = {"steps": steps, "seeds": seeds, "guidance_scale": guidance_scale}

    reference = denoise(
        as_noise_predictor(unet if unet is not None else model.unet),
        sched,
        noise.clone(),
        conditioning=encode_prompts(model, prompts, negative_prompt, device="cpu"),
        decode=model_decoder(model),
        **common,
    )
    encode = onnx_text_encoder(text_encoder_path, model.tokenizer, threads)
    backend = load_backend("onnxruntime", file=Path(unet_path), threads=threads)
    candidate = denoise(
        backend.predict,
        sched,
        noise.clone(),
        conditioning=onnx_prompt_conditioning(encode, prompts, negative_prompt),
        decode=onnx_vae_decoder(vae_decoder_path, model.vae.config, threads),
        **common,
    )
    return {
        "psnr": psnr(reference, candidate),
        "max_abs_error": float((reference - candidate).abs().max()),
        "prompts": prompts,
        "seed": seed,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "scheduler": scheduler,
        "torch": reference,
        "onnx": candidate,
    }
