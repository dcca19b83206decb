"""Train a small ``diffusers.AutoencoderKL`` (the VAE of a latent diffusion model) on images in memory.

Made for the embedded demo's Stable-Diffusion-layout pipeline: :data:`DIGITS_VAE` takes scikit-learn's
digits at 16 x 16 x 1 to 8 x 8 x 4 latents (one downsampling) with about 220k parameters. The loss is
a reconstruction term (L1, as the KL-f autoencoders of Stable Diffusion, or MSE) on the decoded
posterior draw, plus ``kl_weight`` times the posterior's KL divergence to N(0, I), both per pixel (the
convention of Stable Diffusion's ``kl_weight=1e-6``: summed reconstruction and summed KL, divided by
the same pixel count). No perceptual or adversarial term: 16 x 16 digits need neither.

Everything random (the initial weights, each step's batch and posterior draw) comes from ``seed`` and
the step, so the same call gives the same weights on the same machine. At the end the latents'
spread sets ``scaling_factor``, as Stable Diffusion chose 0.18215: 1 / std of the encoded training
images, so that scaled latents have unit variance like the noise the UNet is trained against. The std
is that of the posterior means (``latent_dist.mode()``), the latents the product's encoded cache
(``compressor/encoded_cache.py``) computes, over all the images given.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

DIGITS_VAE: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "in_channels": 1,
    "out_channels": 1,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [32, 32],  # two levels: one downsampling, 16 x 16 -> 8 x 8
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 16,
    "act_fn": "silu",
}
"""The digits' autoencoder: 16 x 16 x 1 images, 8 x 8 x 4 latents, 217,637 parameters."""

Progress = Callable[[int, dict[str, float]], None]
"""Called after each step with the step (1-based) and its ``loss``, ``reconstruction`` and ``kl``."""


@dataclass
class AutoencoderTraining:
    """What :func:`train_autoencoder` gives back."""

    vae: Any  # diffusers.AutoencoderKL, in eval mode, scaling_factor set
    losses: list[list[float]] = field(default_factory=list)  # [step, loss, reconstruction, kl]
    scaling_factor: float = 1.0
    seconds: float = 0.0


def build_autoencoder(config: dict[str, Any] = DIGITS_VAE, seed: int = 0) -> Any:
    """An ``AutoencoderKL`` from ``config`` with weights drawn from ``seed`` (the global RNG is untouched)."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL.from_config(dict(config))


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def autoencoder_loss(
    vae: Any, x: torch.Tensor, kl_weight: float, loss: str = "l1", generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, reconstruction, kl) on the batch ``x``: the decoded posterior draw against ``x``, and the
    posterior's KL to N(0, I) divided by the pixels of one image."""
    posterior = vae.encode(x).latent_dist
    z = posterior.sample(generator=generator)
    out = vae.decode(z).sample
    rec = F.l1_loss(out, x) if loss == "l1" else F.mse_loss(out, x)
    kl = posterior.kl().mean() / x[0].numel()
    return rec + kl_weight * kl, rec, kl


@torch.no_grad()
def encode_latents(vae: Any, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The posterior means of ``images`` (N, C, H, W) in [-1, 1], unscaled."""
    parts = [
        vae.encode(images[i : i + batch_size]).latent_dist.mode() for i in range(0, len(images), batch_size)
    ]
    return torch.cat(parts)


@torch.no_grad()
def reconstruction_error(vae: Any, images: torch.Tensor, batch_size: int = 256) -> dict[str, float]:
    """How well ``vae`` reconstructs ``images`` through the posterior mean: ``mae`` and ``rmse`` on the
    [-1, 1] scale, and ``psnr`` in dB for that peak-to-peak range of 2."""
    out = torch.cat(
        [
            vae.decode(vae.encode(images[i : i + batch_size]).latent_dist.mode()).sample
            for i in range(0, len(images), batch_size)
        ]
    )
    err = out.clamp(-1, 1) - images
    mse = float(err.pow(2).mean())
    return {
        "mae": float(err.abs().mean()),
        "rmse": mse**0.5,
        "psnr": 10 * torch.log10(torch.tensor(4.0 / mse)).item(),
    }


def train_autoencoder(
    images: torch.Tensor,
    config: dict[str, Any] = DIGITS_VAE,
    steps: int = 600,
    batch_size: int = 64,
    lr: float = 1e-3,
    kl_weight: float = 1e-4,
    loss: str = "l1",
    seed: int = 0,
    progress: Progress | None = None,
) -> AutoencoderTraining:
    """Train an ``AutoencoderKL`` built from ``config`` on ``images`` (N, C, H, W) in [-1, 1].

    Adam at ``lr`` with a cosine decay to zero over ``steps``; each step draws ``batch_size`` images with
    replacement. Returns the model in eval mode with ``scaling_factor`` set to 1 / std of its latents.
    """
    if loss not in ("l1", "mse"):
        raise ValueError(f"loss={loss!r}: use 'l1' or 'mse'")
    if images.ndim != 4 or images.shape[1] != config["in_channels"]:
        raise ValueError(
            f"images of shape {tuple(images.shape)}: expected (N, {config['in_channels']}, H, W)"
        )
    started = time.monotonic()
    vae = build_autoencoder(config, seed).train()
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    result = AutoencoderTraining(vae)
    for step in range(1, steps + 1):
        g = _step_generator(seed, step)
        x = images[torch.randint(len(images), (batch_size,), generator=g)]
        total, rec, kl = autoencoder_loss(vae, x, kl_weight, loss, generator=g)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        sched.step()
        values = {"loss": total.item(), "reconstruction": rec.item(), "kl": kl.item()}
        result.losses.append([step, values["loss"], values["reconstruction"], values["kl"]])
        if progress is not None:
            progress(step, values)
    vae.eval()
    result.scaling_factor = 1.0 / float(encode_latents(vae, images).std())
    vae.register_to_config(scaling_factor=result.scaling_factor)
    result.seconds = time.monotonic() - started
    return result
