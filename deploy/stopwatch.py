"""Latency measurement: dense and compressed alternately, so that drift cancels.

Each measurement is a warm-up, then repeated timed calls with a device synchronise
around each (``torch.cuda.synchronize`` on CUDA). Medians and 95th percentiles are
reported in milliseconds, for one UNet call and for the whole sampler (UNet x steps
+ scheduler, the loop users run). A conditional model's calls are fed its conditioning
(``encoder_hidden_states`` / ``class_labels``); under classifier-free guidance the UNet is called on
twice the batch, as the sampler calls it. The whole text-to-image call, timed by component, is
:mod:`deploy.whole_call`.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable

import numpy as np
import torch

from compressor.guidance import Conditioning, uses_guidance
from compressor.sampling import denoise, initial_noise


def sync() -> None:
    """Wait for the GPU's queued work (nothing on a CPU-only host): timed spans end here."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def percentile_ms(samples: list[float]) -> tuple[float, float]:
    """(median, p95) of durations in seconds, as milliseconds."""
    arr = np.asarray(samples) * 1000.0
    return float(np.median(arr)), float(np.percentile(arr, 95))


def time_alternating(
    calls: dict[str, Callable[[], object]], warmup: int, repeat: int
) -> dict[str, list[float]]:
    """Warm each call up, then time them in turns (A, B, A, B, ...); seconds per call."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    sync()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeat):
        for name, fn in calls.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def unet_call(
    predict,
    shape: tuple,
    batch: int,
    device,
    conditioning: Conditioning | None = None,
    guidance_scale: float = 1.0,
) -> Callable[[], object]:
    """One UNet call on fixed inputs for ``batch`` images.

    ``conditioning`` (one row per image) is fed by keyword; with ``guidance_scale`` > 1 the call is
    on twice the batch (the unconditional rows, then the conditional ones), as each guided sampling
    step calls the UNet (:func:`compressor.sampling.denoise`).
    """
    guided = uses_guidance(conditioning, guidance_scale)
    rows = 2 * batch if guided else batch
    g = torch.Generator().manual_seed(0)
    sample = torch.randn((rows, *shape), generator=g).to(device)
    timestep = torch.full((rows,), 500, dtype=torch.long, device=device)
    cond = {} if conditioning is None else conditioning.inputs(guided, device)
    return lambda: predict(sample, timestep, **cond)


def sampler_call(
    predict,
    scheduler,
    shape: tuple,
    batch: int,
    steps: int,
    device,
    cache_interval: int = 1,
    cache_schedule: str = "uniform",
    *,
    conditioning: Conditioning | None = None,
    guidance_scale: float = 1.0,
) -> Callable[[], object]:
    """One whole sampler run from fixed noise (``cache_interval`` > 1: with feature reuse).

    ``conditioning`` (one row per image) and ``guidance_scale``: a conditional model's loop, guided
    as :func:`compressor.sampling.denoise` guides it; the latents are not decoded (the UNet loop alone).
    """
    noise = initial_noise(shape, list(range(batch))).to(device)
    return lambda: denoise(
        predict,
        scheduler,
        noise,
        steps,
        cache_interval=cache_interval,
        cache_schedule=cache_schedule,
        conditioning=conditioning,
        guidance_scale=guidance_scale,
    )


def host_facts() -> dict:
    """CPU/GPU description for the record."""
    facts = {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(
            gpu=props.name,
            compute_capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
        )
        try:
            import subprocess

            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
            facts["driver"] = out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            facts["driver"] = None
    return facts
