"""Shared fixtures: tiny UNets built from configs (no downloads), image folders, CLI runner."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from compressor.clip_text import train_clip_tokenizer
from compressor.conditioned_data import DIGIT_NAMES
from compressor.models import build_unet

TINY_UNET = {
    "_class_name": "UNet2DModel",
    "block_out_channels": [16, 32],
    "norm_num_groups": 4,
    "attention_head_dim": 8,  # 4 heads at the 32-channel level
    "layers_per_block": 1,
    "sample_size": 16,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
}

TINY_COND_UNET = {
    "_class_name": "UNet2DConditionModel",
    "block_out_channels": [32, 64],
    "norm_num_groups": 8,
    "attention_head_dim": 4,  # 4 heads (diffusers' legacy name)
    "cross_attention_dim": 16,
    "layers_per_block": 1,
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
}

TINY_VAE = {
    "_class_name": "AutoencoderKL",
    "block_out_channels": [
        8,
        16,
    ],  # two levels: one latent spans 2 x 2 pixels (8 x 8 latents, 16 x 16 images)
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "latent_channels": 4,
    "norm_num_groups": 4,
    "layers_per_block": 1,
    "sample_size": 16,
}

SD_INDEX = {  # a Stable-Diffusion-layout pipeline folder's model_index.json
    "_class_name": "StableDiffusionPipeline",
    "unet": ["diffusers", "UNet2DConditionModel"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "safety_checker": [None, None],
    "feature_extractor": [None, None],
}


def tensorrt_reason() -> str:
    """Why TensorRT cannot run here ("" where it can): tests expect what this host really has."""
    from deploy.tensorrt_backend import unavailable_reason

    return unavailable_reason()


DDPM_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "num_train_timesteps": 1000,
    "clip_sample": True,
}


TOKENIZER_CORPUS = [
    *(f"a handwritten digit {name}" for name in DIGIT_NAMES),
    "a cat on a mat",
    "a dog on the moon",
    "the empty prompt",
]
"""What the tests' CLIP tokenizer is trained on: each word here is one token, any other text splits."""


@pytest.fixture(scope="session")
def clip_tokenizer_folder(tmp_path_factory):
    """``make(max_length) -> folder``: a CLIP tokenizer trained by the project's own
    ``train_clip_tokenizer`` on :data:`TOKENIZER_CORPUS`, in CLIP's format; one folder per length,
    trained once a session. Load it with ``CLIPTokenizer.from_pretrained(folder)``, copy it into a
    pipeline's ``tokenizer/``."""
    folders: dict[int, Path] = {}

    def make(max_length: int) -> Path:
        if max_length not in folders:
            folder = tmp_path_factory.mktemp(f"clip-tokenizer-{max_length}")
            train_clip_tokenizer(TOKENIZER_CORPUS, folder, max_length=max_length)
            folders[max_length] = folder
        return folders[max_length]

    return make


@pytest.fixture(autouse=True)
def _offline_and_small(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("COMPRESS_DEPLOY_CACHE", str(tmp_path / "cache"))  # latency tables: per test
    torch.set_num_threads(2)


@pytest.fixture
def tiny_unet():
    return build_unet(TINY_UNET, seed=0).eval()


@pytest.fixture
def tiny_cond_unet():
    return build_unet(TINY_COND_UNET, seed=0).eval()


def write_model_folder(folder: Path, unet_cfg: dict = TINY_UNET, seed: int = 0) -> Path:
    """A local diffusers model folder (config.json + safetensors + scheduler_config.json)."""
    unet = build_unet(unet_cfg, seed=seed)
    unet.save_pretrained(str(folder), safe_serialization=True)
    (folder / "scheduler_config.json").write_text(json.dumps(DDPM_SCHEDULER))
    return folder


@pytest.fixture
def model_folder(tmp_path):
    return write_model_folder(tmp_path / "tiny-model")


def write_images(folder: Path, count: int, size: int = 20, mode: str = "RGB") -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(count):
        c = 3 if mode == "RGB" else 1
        arr = (torch.rand(size, size + 4, c, generator=g) * 255).to(torch.uint8).squeeze(-1).numpy()
        p = folder / f"img{i:03d}.png"
        Image.fromarray(arr, mode).save(p)
        paths.append(p)
    return paths


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (to prove nothing was written over)."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


TINY_CONFIG = """
seed: 0
device: cpu
model:
  name: {model}
  init: pretrained
data:
  source: {data}
prune:
  method: diff-pruning
  ratio: 0.25
  threshold: 0.05
  timestep_stride: 100
  batch_size: 4
finetune:
  steps: 4
  batch_size: 4
  checkpoint_every: 2
  log_every: 1
sample:
  steps: 3
  num_images: 4
quality:
  num_samples: 8
"""


@pytest.fixture
def tiny_config(tmp_path, model_folder):
    """A config over the tiny local model and a folder of 8 RGB images."""
    images = tmp_path / "images"
    write_images(images, 8)
    return write_config(tmp_path / "tiny.yaml", TINY_CONFIG.format(model=model_folder, data=images))


def finished_tiny_run(root: Path, stages: str) -> tuple[Path, Path]:
    """Run ``stages`` of the tiny config (local model folder + 8 images) under ``root``."""
    from pipeline.cli import main

    model = write_model_folder(root / "model")
    images = root / "images"
    write_images(images, 8)
    cfg = write_config(root / "tiny.yaml", TINY_CONFIG.format(model=model, data=images))
    run_dir = root / "run"
    assert main([str(cfg), "--stages", stages, "--run-dir", str(run_dir)]) == 0
    return cfg, run_dir


def placeholder_engines(run: Path, precision: str = "fp32", parts: tuple[str, ...] = ("unet",)) -> list[Path]:
    """Engine files with real engine info where a GPU build would put them (the bytes are no engine).

    For the CPU tests of what carries or refuses engines; nothing here can execute them.
    """
    from deploy.engine_info import write_engine_info
    from rundir import layout

    written = []
    for model in ("dense", "pruned"):
        for part in parts:
            engine = layout.engine_path(run, model, part, 0)
            engine.parent.mkdir(parents=True, exist_ok=True)
            data = f"placeholder {model} {part}".encode()
            engine.write_bytes(data)
            info = {"onnx": f"unet-{part}.onnx", "onnx_sha256": "0" * 64}
            info.update(engine_sha256=hashlib.sha256(data).hexdigest(), tensorrt_version="10.13.3.9")
            info.update(gpu_name="NVIDIA H200", compute_capability="9.0", precision=precision)
            info["profile"] = {"min_batch": 1, "opt_batch": 4, "max_batch": 16}
            written += [engine, write_engine_info(engine, info)]
    return written


def conditional_config(model: Path, data: Path, **sections: dict):
    """A tiny conditional run's config: Diff-Pruning at 0.3, a 2-step finetune, 2 images of 3 guided
    sampling steps (scale 3). Each of ``sections`` is merged into the section of its name (or adds it)."""
    from compressor.config import config_from_mapping

    base: dict = {
        "seed": 0,
        "device": "cpu",
        "model": {"name": str(model)},
        "data": {"source": str(data)},
        "prune": {"method": "diff-pruning", "ratio": 0.3, "timestep_stride": 250, "batch_size": 4},
        "finetune": {"steps": 2, "batch_size": 4, "checkpoint_every": 2, "log_every": 1},
        "sample": {"steps": 3, "num_images": 2, "batch_size": 2, "guidance_scale": 3.0},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return config_from_mapping(base)


def text_to_image_folders(root: Path, make_tokenizer, images: int = 4, tokens: int = 6) -> tuple[Path, Path]:
    """A tiny Stable-Diffusion-layout pipeline folder (``make_tokenizer``: the ``clip_tokenizer_folder``
    fixture) and a folder of ``images`` captioned digits under ``root``: (pipeline, data)."""
    from tests.test_components import write_pipeline
    from tests.test_conditioning_data import captioned

    pipe = write_pipeline(root / "pipe", tokenizer=make_tokenizer(tokens))
    return pipe, captioned(root / "images", images)
