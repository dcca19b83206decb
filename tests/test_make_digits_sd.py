"""scripts/make_digits_sd.py: the digits demo's tokenizer, text encoder, VAE, scheduler, model_index.json
and UNet (trained by the product's loop) in Stable Diffusion's layout, loadable by diffusers (a few VAE
and UNet steps here; the real build trains them longer: compressor/assets/digits-sd)."""

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


def test_the_folder_is_a_complete_pipeline_that_loads_in_diffusers(tmp_path, capsys):
    out = tmp_path / "digits-sd"
    args = [str(out), "--vae-steps", "2", "--unet-steps", "3", "--text-hidden", "16"]
    assert make_digits_sd.main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in out.iterdir()) == [
        "make_digits_sd.json",
        "model_index.json",
        "scheduler",
        "text_encoder",
        "tokenizer",
        "unet",
        "vae",
    ]
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
    check = summary["check"]
    assert check["pipeline"] == "StableDiffusionPipeline" and check["image_shape"] == [1, 16, 16]
    assert 0 <= check["accuracy_diffusers"] <= 1 and len(check["predicted_loop"]) == 40
    assert summary["unet"]["finetune"]["steps"] == 3 and summary["unet"]["finetune"]["cond_dropout"] == 0.1
    assert summary["unet"]["latents"] == [1797, 4, 8, 8] and summary["unet"]["caption_rows"] == 11
    recorded = json.loads((out / "make_digits_sd.json").read_text())
    assert recorded["unet"]["losses"] and recorded["check"] == check
    assert check["tokens"][1:5] == ["a</w>", "handwritten</w>", "digit</w>", "seven</w>"]
    configs = {part: json.loads((out / part / "config.json").read_text()) for part in ("vae", "text_encoder")}
    assert (
        configs["text_encoder"]["hidden_size"] == 16
        and configs["text_encoder"]["max_position_embeddings"] == 16
    )
    assert configs["vae"]["scaling_factor"] == pytest.approx(summary["vae"]["scaling_factor"])
    unet = json.loads((out / "unet" / "config.json").read_text())
    assert unet["_class_name"] == "UNet2DConditionModel" and unet["cross_attention_dim"] == 16
    spec = ModelSpec(unet, vae=configs["vae"], text_encoder=configs["text_encoder"], tokenizer={})
    assert spec.sample_shape == (4, 8, 8) and spec.image_shape == (1, 16, 16)  # what the UNet sees
    assert make_digits_sd.main([str(out)]) == 2  # never over a folder that holds something
