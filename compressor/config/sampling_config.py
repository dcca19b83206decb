"""Config sections ``sample`` (how images are generated) and ``quality`` (how they are scored)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from compressor.config.fields import Backend, Scheduler, _spec


@dataclass
class SampleConfig:
    """Image generation (grids, quality, sampler benchmarks)."""

    scheduler: Scheduler = _spec("ddim", "sampling scheduler")
    steps: int = _spec(50, "sampling steps", ge=1)
    eta: float = _spec(0.0, "DDIM eta", ge=0.0, le=1.0)
    num_images: int = _spec(16, "images in the grid", ge=1)
    batch_size: int = _spec(64, "images per UNet call", ge=1)
    seed: int = _spec(0, "first noise seed (image i uses seed + i)", ge=0)
    cache_interval: int = _spec(
        1, "feature reuse (DeepCache): a full UNet pass every N steps, shallow passes between; 1 = off", ge=1
    )
    cache_level: int = _spec(
        0, "feature reuse boundary: the skip branch of this level (0 = shallowest)", ge=0
    )
    cache_schedule: Literal["uniform", "quadratic"] = _spec(
        "uniform", "which steps run the full pass: every N-th, or as many spaced denser early"
    )
    precision: Literal["fp32", "fp16", "int8"] = _spec(
        "fp32", "sampler precision: the torch dtype, or which exported ONNX file runs (int8: ONNX only)"
    )
    guidance_scale: float = _spec(
        7.5,
        "conditional models: classifier-free guidance scale (1 or below: no guidance, one UNet call)",
        ge=0.0,
    )
    prompts: list[str] | None = _spec(
        None, "conditional models: the prompts (text) or class indices as strings (class) image i cycles "
        "through; null: prompt_file, else the data's distinct captions or classes",
    )  # fmt: skip
    prompt_file: str | None = _spec(None, "conditional models: a UTF-8 file of prompts, one a line")
    negative_prompt: str | None = _spec(
        None, "text-conditioned models: the prompt guidance steers away from (null: the empty prompt)"
    )

    @property
    def reuse_level(self) -> int | None:
        """The feature-reuse split level when reuse is on (``cache_interval`` > 1), else None."""
        return self.cache_level if self.cache_interval > 1 else None


@dataclass
class QualityConfig:
    """Consistency (SSIM/PSNR vs dense) and Frechet distance of generated samples."""

    num_samples: int | Literal["auto"] = _spec(
        256, "images generated per model; auto: in chunks until every quality gate is decided", ge=2
    )
    max_samples: int = _spec(4096, "num_samples auto: the most images drawn per model", ge=2)
    chunk_samples: int = _spec(1024, "num_samples auto: images added per model at each look", ge=2)
    steps: int | None = _spec(None, "sampling steps (default: sample.steps)", ge=1)
    feature: Literal["auto", "digits", "inception"] = _spec(
        "auto", "Frechet features: digits (demo network), inception (FID); auto picks by data"
    )
    inception_weights: str | None = _spec(None, "local Inception weights file for offline FID")
    require_fid: bool = _spec(False, "fail (instead of recording unavailable) when FID cannot run")
    num_reference: int | None = _spec(None, "reference images (default: all)", ge=2)
    backend: Backend = _spec(
        "torch", "backend sampling the dense and final model (tensorrt: the engines, on GPU)"
    )
    compare_raw: bool = _spec(True, "also score the finetune's raw (non-EMA) weights")
    compare_pruned: bool = _spec(
        True, "also score the pruned model before finetuning (what the finetune recovered)"
    )
    clip_model: str | None = _spec(
        None, "text-conditioned models: a local CLIPModel folder; prompt adherence as CLIP score"
    )
    interval_level: float = _spec(
        0.95, "level of every quality figure's interval (paired over seeds)", gt=0.0, lt=1.0
    )
    interval_method: Literal["jackknife", "bootstrap"] = _spec(
        "jackknife", "replicates behind the intervals, paired over seeds (see docs/quality.md)"
    )
    resamples: int = _spec(
        1000, "replicates per interval: jackknife groups (one seed each up to this count) or bootstrap draws",
        ge=20,
    )  # fmt: skip

    @property
    def fixed_samples(self) -> int:
        """The image count of a figure scored once (sweeps, the frontier): ``num_samples``, or with
        ``auto`` the first look's ``chunk_samples``."""
        return self.num_samples if isinstance(self.num_samples, int) else self.chunk_samples
