"""scripts/make_digits_sd.py: the digits demo's tokenizer, text encoder, VAE, scheduler and
model_index.json in Stable Diffusion's layout, without the UNet, loadable by diffusers (a few VAE steps
here; the real build trains it longer)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from compressor.components import ModelSpec

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("make_digits_sd", ROOT / "scripts" / "make_digits_sd.py")
make_digits_sd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_digits_sd)

pytest.importorskip("transformers")


def test_the_folder_has_every_component_but_the_unet_and_loads_in_diffusers(tmp_path, capsys):
    out = tmp_path / "digits-sd"
    assert make_digits_sd.main([str(out), "--vae-steps", "2", "--text-hidden", "16"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in out.iterdir()) == [
        "make_digits_sd.json",
        "model_index.json",
        "scheduler",
        "text_encoder",
        "tokenizer",
        "vae",
    ]  # no unet/: the product's training loop makes it
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["unet"] == [
        "diffusers",
        "UNet2DConditionModel",
    ]
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    ddpm = json.loads((ROOT / "compressor/assets/digits-ddpm/scheduler_config.json").read_text())
    assert {k: v for k, v in scheduler.items() if k not in ("clip_sample", "steps_offset")} == {
        k: v for k, v in ddpm.items() if k != "clip_sample"
    }
    assert scheduler["clip_sample"] is False  # latents are not bounded to [-1, 1]
    check = summary["diffusers_check"]
    assert check["pipeline"] == "StableDiffusionPipeline" and check["image_shape"] == [1, 16, 16]
    assert check["tokens"][1:5] == ["a</w>", "handwritten</w>", "digit</w>", "seven</w>"]
    configs = {part: json.loads((out / part / "config.json").read_text()) for part in ("vae", "text_encoder")}
    assert (
        configs["text_encoder"]["hidden_size"] == 16
        and configs["text_encoder"]["max_position_embeddings"] == 16
    )
    assert configs["vae"]["scaling_factor"] == pytest.approx(summary["vae"]["scaling_factor"])
    unet = {
        "_class_name": "UNet2DConditionModel",
        "in_channels": 4,
        "sample_size": 8,
        "cross_attention_dim": 16,
    }
    spec = ModelSpec(unet, vae=configs["vae"], text_encoder=configs["text_encoder"], tokenizer={})
    assert spec.sample_shape == (4, 8, 8) and spec.image_shape == (1, 16, 16)  # what the UNet will see
    assert make_digits_sd.main([str(out)]) == 2  # never over a folder that holds something
