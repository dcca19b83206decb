"""One explicit, backend-agnostic sampling loop over diffusers schedulers.

Any ``unet(sample, timestep) -> noise`` callable plugs in: a torch module (see
:func:`compressor.models.as_noise_predictor`), an ONNX Runtime session or a
TensorRT engine. Image ``i`` always starts from the noise of seed ``seed + i`` (numpy's
PCG64 normals: see :func:`seed_noise`) and,
for stochastic samplers (DDIM with eta > 0, DDPM), draws every step's noise from its
own generator too, so an image depends only on (seed, steps, scheduler, eta): never on
the batch it was computed in or its neighbours there (a batching server relies on this),
and dense and pruned models (and every backend) are compared on the same noise.

Conditional models (:mod:`compressor.guidance`): ``conditioning`` feeds ``predict`` the prompts'
embeddings or class labels as keyword arguments, ``guidance_scale`` > 1 applies classifier-free
guidance (both halves in one call at twice the batch, as diffusers does), and ``decode`` (a latent
model's VAE: :func:`compressor.guidance.vae_decoder`) turns the final latents into images. Without
them a call is the unconditional loop it always was, bit for bit.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch

from compressor.errors import ConfigError
from compressor.feature_reuse import full_steps
from compressor.guidance import (
    DISTILLED_GUIDANCE,
    Conditioning,
    check_guidance,
    combine,
    distilled_scale,
    sampled_guidance,
    uses_guidance,
)
from compressor.models import NoisePredictor, ReusePredictor

# The samplers by name: diffusers' class and the settings that make it the named method.
# DPM-Solver++ (Lu et al. 2022) and UniPC (Zhao et al. 2023) are 2nd-order multistep solvers
# that keep history between steps: the loop always steps a fresh copy.
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {"solver_order": 2}),
}


def make_scheduler(kind: str, scheduler_config: dict):
    """A fresh scheduler ``kind`` (see :data:`SCHEDULERS`) built from a model's scheduler config.

    The model's training schedule (betas, timesteps, prediction type) carries over; keys
    a solver does not know (e.g. DDPM's ``variance_type``) are dropped, not warned about. A
    guidance-distilled student's scale (:data:`compressor.guidance.DISTILLED_GUIDANCE`) stays on the
    scheduler, so :func:`denoise` samples it on the conditional half alone.
    """
    import inspect

    import diffusers

    if kind not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {kind!r}; choose one of {', '.join(SCHEDULERS)}")
    name, settings = SCHEDULERS[kind]
    cls = getattr(diffusers, name)
    known = set(inspect.signature(cls.__init__).parameters)
    cfg = {k: v for k, v in scheduler_config.items() if k in known}
    scheduler = cls.from_config({**cfg, **settings})
    distilled = distilled_scale(scheduler_config)
    if distilled is not None:
        setattr(scheduler, DISTILLED_GUIDANCE, distilled)
    return scheduler


def seed_noise(shape: tuple[int, ...], seed: int):
    """Image ``seed``'s starting noise: float32 standard normals from numpy's PCG64 (a numpy array).

    A noise source that numpy alone reproduces, so a sampler bundle running on numpy and
    ONNX Runtime (``compress-deploy bundle``) starts every image from exactly this noise.
    """
    import numpy as np

    return np.random.Generator(np.random.PCG64(seed)).standard_normal(shape, dtype=np.float32)


def initial_noise(shape: tuple[int, int, int], seeds: list[int]) -> torch.Tensor:
    """Stacked starting noise, one generator per image (:func:`seed_noise`) so batching never changes it."""
    import numpy as np

    return torch.from_numpy(np.stack([seed_noise(shape, s) for s in seeds]))


STEP_NOISE_STREAM = 1 << 63  # step-noise generators are seeded seed | 2^63: apart from initial noise


def step_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image for the noise a stochastic sampler adds at each step."""
    return [torch.Generator().manual_seed(STEP_NOISE_STREAM | s) for s in seeds]


def denoise(
    predict: NoisePredictor,
    scheduler,
    noise: torch.Tensor,
    steps: int,
    eta: float = 0.0,
    seeds: list[int] | None = None,
    on_step: Callable[[int], None] | None = None,
    cache_interval: int = 1,
    cache_schedule: str = "uniform",
    *,
    conditioning: Conditioning | None = None,
    guidance_scale: float = 1.0,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run the reverse process from ``noise``; returns images in [0, 1] (CPU, float32).

    ``seeds`` (one per image, default 0..N-1) seed each image's step-noise generator.
    ``cache_interval`` > 1 reuses deep features (DeepCache): ``predict`` must then be a
    :class:`compressor.models.ReusePredictor`; the full pass runs at the steps
    :func:`compressor.feature_reuse.full_steps` names, the shallow pass in between.

    ``conditioning`` (one row per image) is passed to ``predict`` by keyword
    (``encoder_hidden_states`` or ``class_labels``). ``guidance_scale`` > 1 calls ``predict`` once
    per step on the batch doubled (unconditional rows first) and combines ``uncond + scale * (cond -
    uncond)``; at 1 or below (diffusers' rule) the conditional rows alone are predicted. ``noise``
    is then in the denoiser's (latent) shape and ``decode`` maps the final latents to images in
    [-1, 1]. A few-step student distilled from the guided teacher at a fixed scale (its schedule from
    :func:`make_scheduler` says so: :func:`compressor.guidance.distilled_scale`) is sampled on the
    conditional rows alone whatever ``guidance_scale`` is: the guidance is in its weights.
    With feature reuse both passes take the conditioning too (``predict.full(x, t, **cond)``,
    ``predict.shallow(x, t, feature, **cond)``), under guidance on both halves at once, so the cached
    feature holds the unconditional and the conditional rows.
    """

    check_guidance(conditioning, guidance_scale, noise.shape[0], cache_interval)
    guidance_scale = sampled_guidance(scheduler, guidance_scale)  # a guidance-distilled student: 1
    guided = uses_guidance(conditioning, guidance_scale)
    if cache_interval > 1 and not isinstance(predict, ReusePredictor):
        raise ConfigError(
            f"sample.cache_interval={cache_interval} needs a backend built for feature reuse "
            "(its full and shallow passes); this one has a single UNet call"
        )
    full_at = set(full_steps(steps, cache_interval, cache_schedule)) if cache_interval > 1 else None
    feature = None
    scheduler = copy.deepcopy(scheduler)
    # 1. choose the timesteps the sampler visits
    scheduler.set_timesteps(steps)
    seeds = list(range(noise.shape[0])) if seeds is None else seeds
    if len(seeds) != noise.shape[0]:
        raise ValueError(f"denoise: {len(seeds)} seeds for a batch of {noise.shape[0]}")
    params = _step_params(scheduler)
    step_kwargs = {"eta": eta} if "eta" in params else {}
    if "generator" in params:  # diffusers' randn_tensor draws image i from generator[i]
        step_kwargs["generator"] = step_generators(seeds)
    x = noise * scheduler.init_noise_sigma
    cond = {} if conditioning is None else conditioning.inputs(guided, x.device, x.dtype)
    for i, t in enumerate(scheduler.timesteps):
        # 2. predict the noise at this timestep (a full or a shallow pass when reusing features;
        # both halves at once under guidance)
        model_in = torch.cat([x, x]) if guided else x
        if hasattr(scheduler, "scale_model_input"):  # the identity for DDIM, DDPM, DPM-Solver, UniPC
            model_in = scheduler.scale_model_input(model_in, t)
        timestep = torch.full((model_in.shape[0],), int(t), dtype=torch.long, device=x.device)
        if full_at is None and isinstance(predict, ReusePredictor):  # its full pass, with the conditioning
            eps = predict.full(model_in, timestep, **cond)[0]
        elif full_at is None:
            eps = predict(model_in, timestep, **cond)
        elif i in full_at:
            eps, feature = predict.full(model_in, timestep, **cond)
        else:
            eps = predict.shallow(model_in, timestep, feature, **cond)
        eps = eps.to(x.dtype)
        if guided:
            eps = combine(eps, guidance_scale)
        # 3. let the scheduler take one reverse step
        x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
        if on_step:
            on_step(i)
    # 4. decode latents (a latent model), then map from [-1, 1] to [0, 1]
    if decode is not None:
        x = decode(x)
    return ((x.float().cpu() + 1) / 2).clamp(0, 1)


def _step_params(scheduler) -> set[str]:
    import inspect

    return set(inspect.signature(scheduler.step).parameters)


def generate(
    predict: NoisePredictor,
    scheduler,
    image_shape: tuple[int, int, int],
    num_images: int,
    steps: int,
    eta: float = 0.0,
    seed: int = 0,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    on_batch: Callable[[int], None] | None = None,
    cache_interval: int = 1,
    cache_schedule: str = "uniform",
    *,
    conditioning: Conditioning | None = None,
    guidance_scale: float = 1.0,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``num_images`` images from seeds ``seed .. seed + num_images - 1`` in batches (see :func:`denoise`).

    ``image_shape`` is the denoiser's sample shape (latents for a latent model, decoded by
    ``decode``); ``conditioning`` holds one row per image (image ``i``: row ``i``), split with the batches.
    """
    if conditioning is not None and len(conditioning) != num_images:
        raise ConfigError(f"conditioning for {len(conditioning)} images given for {num_images} images")
    out = []
    for start in range(0, num_images, batch_size):
        seeds = list(range(seed + start, seed + min(num_images, start + batch_size)))
        noise = initial_noise(image_shape, seeds).to(device=device, dtype=dtype)
        rows = None if conditioning is None else conditioning.rows(start, start + len(seeds))
        kw = {"conditioning": rows, "guidance_scale": guidance_scale, "decode": decode}
        out.append(
            denoise(predict, scheduler, noise, steps, eta, seeds, None, cache_interval, cache_schedule, **kw)
        )
        if on_batch:
            on_batch(len(seeds))
    return torch.cat(out)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> (N, H, W, C) uint8."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def grid_image(images: torch.Tensor, nrow: int = 8, pad: int = 2, scale: int = 1):
    """A PIL image tiling ``images`` (N, C, H, W in [0, 1]) in rows of ``nrow``."""
    from PIL import Image

    arr = to_uint8(images)
    n, h, w, c = arr.shape
    rows = (n + nrow - 1) // nrow
    canvas = torch.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[y : y + h, x : x + w] = arr[i]
    mode = "L" if c == 1 else "RGB"
    img = Image.fromarray(canvas.squeeze(-1).numpy() if c == 1 else canvas.numpy(), mode)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    return img


def save_comparison(rows: dict[str, torch.Tensor], path: Path, nrow: int = 8) -> Path:
    """Save labelled grids one above the other (e.g. dense vs pruned from the same seeds)."""
    from PIL import Image, ImageDraw

    h_img = next(iter(rows.values())).shape[-1]
    scale = max(1, 64 // h_img)
    grids = {label: grid_image(imgs, nrow, scale=scale) for label, imgs in rows.items()}
    label_h = 16
    width = max(g.width for g in grids.values())
    height = sum(g.height + label_h for g in grids.values())
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for label, g in grids.items():
        draw.text((4, y + 2), label, fill="black")
        canvas.paste(g.convert("RGB"), (0, y + label_h))
        y += g.height + label_h
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    canvas.save(tmp, format="PNG")
    tmp.replace(path)
    return path
