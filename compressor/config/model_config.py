"""Config sections ``model`` (which UNet to compress) and ``data`` (its training images and their
conditioning: captions or class labels)."""

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
    """Training images (Taylor pass, finetuning, Frechet reference); for a conditioned model, their
    captions or class labels (``captions``, ``classes``, ``prompt_template``; read by
    :mod:`compressor.conditioned_data`)."""

    source: str = _spec("digits", "'digits' or a folder of PNG/JPEG images")
    max_images: int | None = _spec(None, "use at most this many images", ge=1)
    max_image_pixels: int = _spec(
        50_000_000, "refuse images larger than this many pixels (decompression bombs)", ge=1
    )
    captions: Literal["auto", "none", "metadata"] = _spec(
        "auto",
        "captions of a text-conditioned model's images: 'metadata' (data.source/metadata.jsonl lines "
        "{file_name, text}, required), 'auto' (metadata.jsonl if present; digits: data.prompt_template) "
        "or 'none'",
    )
    classes: Literal["auto", "none", "subfolders"] = _spec(
        "auto",
        "class labels of a class-conditioned model's images: 'subfolders' (data.source/<class name>/*, "
        "index = sorted folder order), 'auto' (subfolders when every image sits in one; digits: 0-9) "
        "or 'none'",
    )
    prompt_template: str = _spec(
        "a handwritten digit {name}",
        "the digits' captions: {name} is the digit's name (zero..nine), {label} its number (0..9)",
    )
