"""Config section ``acceptance``: the release gates a finished run is checked against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from compressor.config.fields import _spec


@dataclass
class AcceptanceConfig:
    """Release gates; a limit left null is not checked."""

    backend: Literal[
        "torch",
        "torch-fp16",
        "torch-bf16",
        "torch-fp16+cudagraph",
        "torch-fp16+compile",
        "onnxruntime",
        "onnxruntime-int8",
        "tensorrt",
        "tensorrt+cudagraph",
    ] = _spec("onnxruntime", "bench variant the latency gates read (GPU hosts: torch-fp16+cudagraph, ...)")
    batch: int = _spec(1, "batch size the latency gates read", ge=1)
    max_unet_ms: float | None = _spec(None, "max median latency of one compressed UNet call (ms)", gt=0.0)
    max_image_ms: float | None = _spec(
        None, "max compressed sampler latency per image (ms; conditional models: the whole call)", gt=0.0
    )
    min_speedup: float | None = _spec(None, "min UNet-call speed-up vs dense", gt=0.0)
    min_sampler_speedup: float | None = _spec(
        None, "min sampler speed-up vs dense (conditional models: the whole text-to-image call)", gt=0.0
    )
    max_parity_error: float | None = _spec(None, "max abs error, fp32 ONNX vs torch", gt=0.0)
    min_ssim: float | None = _spec(None, "min SSIM vs dense samples", ge=0.0, le=1.0)
    max_fd_ratio: float | None = _spec(
        None, "max FD-infinity of compressed / dense (undecided when dense's interval reaches 0)", gt=0.0
    )
    max_fd_increase: float | None = _spec(
        None, "max FD-infinity of compressed - dense, in the Frechet feature's units", gt=0.0
    )
    max_kid_increase: float | None = _spec(None, "max KID of compressed - dense (unbiased at any N)", gt=0.0)
    min_adherence_ratio: float | None = _spec(
        None,
        "conditional models: min prompt adherence of compressed / dense (its interval's lower end)",
        gt=0.0,
    )
    variant: str | None = _spec(
        None, "bench sampler variant the sampler gates read (SCHEDULER:STEPS[:INTERVAL]; default: the first)"
    )
