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
and reports the PSNR of the decoded images (in [0, 1]) and their largest absolute difference. A
class-conditioned model runs the same comparison with class labels instead of the text encoder graph,
and a pixel model without the VAE decoder graph (the parity stage's whole-call check for every
conditional model).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from compressor.components import DiffusionModel
from compressor.encoded_cache import padded_tokens
from compressor.errors import ModelError
from compressor.guidance import Conditioning, class_conditioning, encode_prompts, model_decoder
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
        ids = padded_tokens(tokenizer, texts).input_ids.numpy().astype("int64")
        return torch.from_numpy(session.run(["last_hidden_state"], {"input_ids": ids})[0])

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
    text_encoder_path: Path | None,
    vae_decoder_path: Path | None,
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
    ``max_abs_error`` of the images in [0, 1], both image batches (``torch``, ``onnx``) and, for a
    latent model, the torch loop's final latents (``latents``, before decoding).

    A class-conditioned model takes class indices as ``prompts`` (no text encoder graph: pass None),
    a pixel model no VAE decoder graph (None). ``unet``: the torch UNet the UNet graph was exported
    from (default ``model.unet``); the model's text encoder and VAE must be on the CPU. ModelError for
    an unconditional model or a missing graph."""
    if model.conditioning == "none":
        raise ModelError("text_to_image_parity: the model is unconditional (no prompts or class labels)")
    text = model.conditioning == "text"
    if text and (model.tokenizer is None or text_encoder_path is None):
        raise ModelError(
            "text_to_image_parity: a text-conditioned model needs its tokenizer and text encoder graph"
        )
    if model.latent and vae_decoder_path is None:
        raise ModelError("text_to_image_parity: a latent model needs its VAE decoder graph")
    prompts = list(prompts)
    seeds = list(range(seed, seed + len(prompts)))
    noise = initial_noise(model.sample_shape, seeds)
    sched = make_scheduler(scheduler, model.scheduler_config)
    common = {"steps": steps, "seeds": seeds, "guidance_scale": guidance_scale}
    if text:
        conditioning = encode_prompts(model, prompts, negative_prompt, device="cpu")
        encode = onnx_text_encoder(Path(text_encoder_path), model.tokenizer, threads)
        onnx_conditioning = onnx_prompt_conditioning(encode, prompts, negative_prompt)
    else:
        conditioning = onnx_conditioning = class_conditioning(model, [int(p) for p in prompts])
    latents: list[torch.Tensor] = []
    torch_decode = model_decoder(model)

    def decode(z: torch.Tensor) -> torch.Tensor:
        latents.append(z.detach().float().cpu().clone())
        return torch_decode(z)

    reference = denoise(
        as_noise_predictor(unet if unet is not None else model.unet),
        sched,
        noise.clone(),
        conditioning=conditioning,
        decode=decode if torch_decode is not None else None,
        **common,
    )
    backend = load_backend("onnxruntime", file=Path(unet_path), threads=threads)
    onnx_decode = (
        onnx_vae_decoder(Path(vae_decoder_path), model.vae.config, threads) if model.latent else None
    )
    candidate = denoise(
        backend.predict, sched, noise.clone(), conditioning=onnx_conditioning, decode=onnx_decode, **common
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
        **({"latents": latents[0]} if latents else {}),
    }
