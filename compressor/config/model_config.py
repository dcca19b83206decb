"""Config sections ``model`` (which UNet to compress) and ``data`` (its training images)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from compressor.config.fields import _spec


@dataclass
class ModelConfig:
    """Which UNet to compress."""

    name: str = _spec("digits-ddpm", "local diffusers folder, hub id, or shipped name")
    init: Literal["pretrained", "random"] = _spec("pretrained", "pretrained weights or random")
    sample_size: int | None = _spec(None, "override the model's sample size", ge=4)


@dataclass
class DataConfig:
    """Training images (Taylor pass, finetuning, Frechet reference)."""

    source: str = _spec("digits", "'digits' or a folder of PNG/JPEG images")
    max_images: int | None = _spec(None, "use at most this many images", ge=1)
    max_image_pixels: int = _spec(
        50_000_000, "refuse images larger than this many pixels (decompression bombs)", ge=1
    )
