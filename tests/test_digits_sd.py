"""The shipped text-to-image demo compressor/assets/digits-sd (scripts/make_digits_sd.py's output): a
complete Stable Diffusion pipeline folder that diffusers loads and that draws the digit it is asked
for, and that the product loads by its shipped name as a text-conditioned latent model."""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path

import pytest
import tomllib
import torch

from compressor.config import ModelConfig
from compressor.features import load_digits_features
from compressor.models import load_model

pytest.importorskip("transformers")

FOLDER = Path(__file__).resolve().parent.parent / "compressor" / "assets" / "digits-sd"


def test_stable_diffusion_pipeline_draws_the_prompted_digit():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(FOLDER), local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(seed) for seed in range(4)]
    with torch.no_grad():
        images = pipe(
            ["a handwritten digit three"] * 4, num_inference_steps=30, guidance_scale=4.0,
            output_type="pt", height=16, width=16, generator=generators,
        ).images  # fmt: skip
        predicted = load_digits_features().eval().logits(images).argmax(1).tolist()
    assert images.shape == (4, 1, 16, 16) and 0 <= images.min() and images.max() <= 1
    assert predicted.count(3) >= 3, predicted


def test_the_product_loads_it_by_its_shipped_name():
    model = load_model(ModelConfig(name="digits-sd"))
    assert model.source == {"kind": "shipped", "name": "digits-sd"}
    assert model.conditioning == "text" and model.spec.latent
    assert model.spec.sample_shape == (4, 8, 8) and model.spec.image_shape == (1, 16, 16)
    assert model.unet.config.cross_attention_dim == model.text_encoder.config.hidden_size == 32


def test_every_file_of_the_folder_is_package_data():
    globs = tomllib.loads((FOLDER.parents[2] / "pyproject.toml").read_text())["tool"]["setuptools"]
    globs = [Path(g) for g in globs["package-data"]["compressor"]]
    files = [p.relative_to(FOLDER.parents[1]) for p in FOLDER.rglob("*") if p.is_file()]
    assert len(files) >= 12
    for rel in files:  # each part matched by the glob's part, as setuptools matches package data
        matched = [g for g in globs if len(g.parts) == len(rel.parts)]
        assert any(all(fnmatch(a, b) for a, b in zip(rel.parts, g.parts, strict=True)) for g in matched), rel
