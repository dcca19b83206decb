"""The GPU hosts' conditional and latent configs, run here on tiny random-weight pipelines of the
same layout: ``configs/sd15.yaml`` (Stable Diffusion 1.5: text encoder, tokenizer, UNet2DConditionModel,
AutoencoderKL, a caption folder) and ``configs/ldm-celebahq.yaml`` (LDMPipeline: UNet2DModel on the
latents of a VQModel ``vqvae``). Each loads, plans (``compress-deploy plan``) and runs its first stages
with only the model, the data and the sizes overridden."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compressor.config import load_config
from compressor.models import load_model
from pipeline.runner import run_pipeline
from rundir import layout
from tests.conftest import DDPM_SCHEDULER, TINY_UNET, write_images

ROOT = Path(__file__).resolve().parents[1]
TOKENS = 6
TINY_VQ = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "latent_channels": 3,
    "norm_num_groups": 4,
    "num_vq_embeddings": 16,
    "vq_embed_dim": 3,
    "sample_size": 16,
}
SMALL = [
    "device=cpu",
    "prune.batch_size=4",
    "prune.timestep_stride=250",
    "finetune.steps=2",
    "finetune.batch_size=4",
    "finetune.checkpoint_every=2",
    "finetune.log_every=1",
    "sample.steps=2",
    "sample.num_images=2",
]


def write_ldm_pipeline(root: Path) -> Path:
    """An LDMPipeline folder as CompVis/ldm-celebahq-256 lays it out: unet/ (UNet2DModel on 3-channel
    latents), vqvae/ (VQModel), scheduler/, model_index.json; random weights."""
    from diffusers import UNet2DModel, VQModel

    torch.manual_seed(0)
    VQModel(**TINY_VQ).save_pretrained(str(root / "vqvae"), safe_serialization=True)
    unet = {k: v for k, v in TINY_UNET.items() if k != "_class_name"}
    UNet2DModel(**{**unet, "sample_size": 8, "in_channels": 3, "out_channels": 3}).save_pretrained(
        str(root / "unet"), safe_serialization=True
    )
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**DDPM_SCHEDULER, "_class_name": "DDIMScheduler"})
    )
    index = {"_class_name": "LDMPipeline", "unet": ["diffusers", "UNet2DModel"],
             "vqvae": ["diffusers", "VQModel"], "scheduler": ["diffusers", "DDIMScheduler"]}  # fmt: skip
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def _plan(config: Path, overrides: list[str], out: Path) -> int:
    from pipeline.cli import main

    argv = ["plan", str(config), *overrides, "--backends", "torch", "--batches", "1", "--repeat", "3"]
    return main([*argv, "--out", str(out)])


def test_the_sd15_config_runs_on_a_tiny_pipeline_of_its_layout(tmp_path, clip_tokenizer_folder):
    from tests.test_components import write_pipeline
    from tests.test_conditioning_data import captioned

    pipe = write_pipeline(tmp_path / "sd15", tokenizer=clip_tokenizer_folder(TOKENS))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("image 1\nimage 2\n")
    overrides = [f"model.name={pipe}", f"data.source={captioned(tmp_path / 'coco', 6)}",
                 f"sample.prompt_file={prompts}", *SMALL]  # fmt: skip
    cfg = load_config(ROOT / "configs" / "sd15.yaml", overrides)
    assert cfg.sample.guidance_scale == 7.5 and cfg.finetune.cond_dropout == 0.1
    assert _plan(ROOT / "configs" / "sd15.yaml", overrides, tmp_path / "plan") == 0
    assert (tmp_path / "plan" / "plan.json").is_file()
    run = tmp_path / "run"
    records = run_pipeline(cfg, run, ["prune", "finetune", "samples"])
    assert records["prune"]["metrics"]["macs_kept"] <= 0.6 + 1e-6  # the MACs target, with the context
    assert records["samples"]["metrics"]["prompts"] == ["image 1", "image 2"]
    assert layout.encoded_text(run).is_file() and layout.encoded_latents(run).is_file()


def test_the_ldm_config_runs_on_a_tiny_pipeline_of_its_layout(tmp_path):
    from diffusers import LDMPipeline, VQModel

    from compressor.config import ModelConfig
    from deploy.sampler import load_pipeline

    pipe = write_ldm_pipeline(tmp_path / "ldm")
    model = load_model(ModelConfig(name=str(pipe)))
    assert isinstance(model.vae, VQModel) and model.latent and model.conditioning == "none"
    assert (model.sample_shape, model.image_shape) == ((3, 8, 8), (3, 16, 16))
    write_images(tmp_path / "celebahq", 8, size=24)
    overrides = [f"model.name={pipe}", f"data.source={tmp_path / 'celebahq'}", *SMALL]
    cfg = load_config(ROOT / "configs" / "ldm-celebahq.yaml", overrides)
    assert _plan(ROOT / "configs" / "ldm-celebahq.yaml", overrides, tmp_path / "plan") == 0
    run = tmp_path / "run"
    records = run_pipeline(cfg, run, ["prune", "finetune", "samples"])
    assert records["prune"]["metrics"]["macs_kept"] <= 0.5 + 1e-6
    assert records["prune"]["metrics"]["taylor_images"] == 4  # latents of the images, encoded once
    assert layout.encoded_latents(run).is_file()
    ldm = load_pipeline(run)
    assert isinstance(ldm, LDMPipeline)
    images = ldm(batch_size=1, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 3)


@pytest.mark.parametrize("name", ["sd15.yaml", "ldm-celebahq.yaml"])
def test_the_gpu_configs_name_their_hub_models_and_refuse_them_offline(name, tmp_path, capsys):
    from pipeline.cli import main

    cfg = load_config(ROOT / "configs" / name)
    assert "/" in cfg.model.name and cfg.stages[0] == "prune" and "distill_steps" not in cfg.stages
    code = main([str(ROOT / "configs" / name), "--stages", "prune", "--run-dir", str(tmp_path / "run")])
    assert code != 0 and "Traceback" not in capsys.readouterr().err
