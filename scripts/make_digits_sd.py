"""Build the text-to-image digits demo's components other than the UNet, in Stable Diffusion's layout.

    python scripts/make_digits_sd.py OUT [--vae-steps 600] [--seed 0] [--max-length 16] [--text-hidden 32]

Everything is made here by the project's own code from scikit-learn's digits (16 x 16, as
``compressor/data.py`` gives them) and their captions (``a handwritten digit seven``, the default
``data.prompt_template``); nothing is downloaded:

- ``OUT/tokenizer/``: a CLIP tokenizer, a byte-level BPE trained on the captions
  (``compressor/clip_text.py``, ``train_clip_tokenizer``), ``model_max_length`` = ``--max-length``;
- ``OUT/text_encoder/``: a seeded random ``CLIPTextModel`` (2 layers, ``--text-hidden`` wide), frozen as
  Stable Diffusion keeps its text encoder (``frozen_text_encoder``); its width is the UNet's
  ``cross_attention_dim``;
- ``OUT/vae/``: an ``AutoencoderKL`` trained on the digits (``compressor/autoencoder_training.py``,
  16 x 16 x 1 -> 8 x 8 x 4 latents), ``scaling_factor`` = 1 / std of its latents;
- ``OUT/scheduler/``: the DDPM schedule of the unconditional demo ``digits-ddpm`` (linear betas
  1e-4..0.02 over 1,000 steps), with ``clip_sample`` off: scaled latents have unit variance and are
  not bounded to [-1, 1] as pixels are, so clipping the predicted x0 there would cut them (diffusers'
  ``StableDiffusionPipeline`` turns it off itself, with a warning); ``steps_offset`` 1 as in SD;
- ``OUT/model_index.json``: ``StableDiffusionPipeline`` and its components' classes (no safety checker,
  no feature extractor);
- ``OUT/make_digits_sd.json``: the settings, the VAE's reconstruction error and the time it took.

``OUT/unet/`` is left out on purpose: the ``UNet2DConditionModel`` (``in_channels`` 4, ``sample_size``
8, ``cross_attention_dim`` = ``--text-hidden``) is trained afterwards by the product's training loop
(``compressor/training.py``) on these latents and captions; ``model_index.json`` already names it. Until
then the folder is not a complete pipeline: the check at the end loads it in diffusers'
``StableDiffusionPipeline.from_pretrained`` with a placeholder random UNet handed in (never saved) and
samples two steps, to prove the layout and every saved component load as diffusers reads them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from compressor.autoencoder_training import DIGITS_VAE, reconstruction_error, train_autoencoder
from compressor.clip_text import frozen_text_encoder, train_clip_tokenizer
from compressor.conditioned_data import digit_caption, digits_labels
from compressor.config import DataConfig
from compressor.data import digits_images
from compressor.progress import progress_bar

DIGITS_DDPM_SCHEDULER = (
    Path(__file__).resolve().parent.parent / "compressor/assets/digits-ddpm/scheduler_config.json"
)
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDPMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def scheduler_config() -> dict:
    """digits-ddpm's DDPM schedule for latents: the same betas, ``clip_sample`` off and ``steps_offset`` 1
    (Stable Diffusion's values, which ``StableDiffusionPipeline`` would otherwise rewrite with a warning)."""
    config = json.loads(DIGITS_DDPM_SCHEDULER.read_text())
    return {**config, "clip_sample": False, "steps_offset": 1}


def check_in_diffusers(out: Path, text_hidden: int) -> dict:
    """Load OUT in ``StableDiffusionPipeline`` with a placeholder random UNet and sample 2 steps."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_hidden, attention_head_dim=4, norm_num_groups=8,
    )  # fmt: skip
    pipe = StableDiffusionPipeline.from_pretrained(str(out), unet=unet, local_files_only=True)
    with torch.no_grad():
        images = pipe(
            ["a handwritten digit seven"], num_inference_steps=2, output_type="pt", height=16, width=16,
            generator=torch.Generator().manual_seed(0),
        ).images  # fmt: skip
    ids = pipe.tokenizer("a handwritten digit seven").input_ids
    return {
        "pipeline": type(pipe).__name__,
        "image_shape": list(images.shape[1:]),
        "tokens": pipe.tokenizer.convert_ids_to_tokens(ids),
    }


def main(argv: list[str] | None = None) -> int:
    """Build OUT's tokenizer, text encoder, VAE, scheduler and model_index.json; print a summary."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--vae-steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=16)
    parser.add_argument("--text-hidden", type=int, default=32)
    parser.add_argument("--no-check", action="store_true", help="skip loading OUT in StableDiffusionPipeline")
    args = parser.parse_args(argv)
    out: Path = args.out
    if out.exists() and any(out.iterdir()):
        print(f"{out} exists and is not empty; give a new folder", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    started = time.monotonic()
    template = DataConfig().prompt_template
    captions = [digit_caption(template, label) for label in digits_labels()]
    tokenizer = train_clip_tokenizer(captions, out / "tokenizer", max_length=args.max_length)
    encoder = frozen_text_encoder(tokenizer, hidden_size=args.text_hidden, layers=2, heads=2, seed=args.seed)
    encoder.save_pretrained(str(out / "text_encoder"))

    images = digits_images(16, 1)
    with progress_bar(args.vae_steps, "[make_digits_sd] vae", "step") as bar:

        def progress(step: int, values: dict[str, float]) -> None:
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(l1=f"{values['reconstruction']:.4f}", kl=f"{values['kl']:.2f}")

        vae_started = time.monotonic()
        trained = train_autoencoder(
            images, DIGITS_VAE, steps=args.vae_steps, seed=args.seed, progress=progress
        )
    vae_seconds = time.monotonic() - vae_started
    trained.vae.save_pretrained(str(out / "vae"), safe_serialization=True)
    (out / "scheduler").mkdir()
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(), indent=2) + "\n")
    (out / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")

    summary = {
        "settings": vars(args) | {"out": str(out), "prompt_template": template},
        "tokenizer": {"vocab_size": len(tokenizer), "model_max_length": tokenizer.model_max_length},
        "text_encoder_parameters": sum(p.numel() for p in encoder.parameters()),
        "vae": {
            "parameters": sum(p.numel() for p in trained.vae.parameters()),
            "scaling_factor": trained.scaling_factor,
            "final_loss": trained.losses[-1][1:] if trained.losses else None,
            "reconstruction_error": reconstruction_error(trained.vae, images),
            "seconds": round(vae_seconds, 1),
        },
        "unet": "not built here: trained later by compressor/training.py",
        "seconds": round(time.monotonic() - started, 1),
    }
    (out / "make_digits_sd.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not args.no_check:
        summary["diffusers_check"] = check_in_diffusers(out, args.text_hidden)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
