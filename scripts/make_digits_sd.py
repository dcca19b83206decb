"""Build the text-to-image digits demo in Stable Diffusion's layout: a complete ``StableDiffusionPipeline``.

    python scripts/make_digits_sd.py OUT [--vae-steps 600] [--unet-steps 2000] [--seed 0] [--max-length 16]
        [--text-hidden 32]

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
- ``OUT/unet/``: a ``UNet2DConditionModel`` (:data:`UNET`: ``in_channels`` 4, ``sample_size`` 8, blocks
  32/64 wide, cross-attention in the first block and the middle, ``cross_attention_dim`` =
  ``--text-hidden``; ~0.8M parameters) trained by the product's own loop (``compressor/training.py``
  ``train``) on the digits' latents and caption embeddings as ``compressor/encoded_cache.py``
  ``encode_dataset`` encodes them, ``finetune.cond_dropout`` 0.1 (classifier-free guidance), saved with
  its EMA weights (:data:`UNET_TRAINING`: ``--unet-steps`` Adam steps, batch 64, lr 1e-3 with warm-up and
  cosine decay; 0.43 s a step on one CPU thread of 2 shared with another job, about 0.2 s
  unshared);
- ``OUT/model_index.json``: ``StableDiffusionPipeline`` and its components' classes (no safety checker,
  no feature extractor);
- ``OUT/make_digits_sd.json``: the settings, the VAE's reconstruction error, the UNet's training
  settings, loss curve and time, and the check's accuracy.

The check at the end (skipped with ``--no-check``) loads OUT in diffusers' own
``StableDiffusionPipeline.from_pretrained``, generates images for each digit's prompt (DDIM,
guidance 4) and classifies them with the shipped digits classifier (``compressor/features.py``):
the share classified as the prompted digit is the demo's accuracy. ``compressor/assets/digits-sd``
is this script's output with the default settings: 40 of 40 images the prompted digit, through
diffusers and through the product's loop (``compressor/sampling.py``), 861 s of UNet training.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from compressor.autoencoder_training import DIGITS_VAE, reconstruction_error, train_autoencoder
from compressor.clip_text import frozen_text_encoder, train_clip_tokenizer
from compressor.components import DiffusionModel
from compressor.conditioned_data import DIGIT_NAMES, digit_caption, digits_labels, load_conditioned_dataset
from compressor.config import DataConfig, FinetuneConfig, ModelConfig
from compressor.data import digits_images
from compressor.encoded_cache import encode_dataset
from compressor.features import load_digits_features
from compressor.guidance import encode_prompts, model_decoder
from compressor.models import as_noise_predictor, build_unet, load_model
from compressor.progress import progress_bar
from compressor.sampling import generate
from compressor.training import train

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

# The UNet: ~0.8M parameters; cross-attention in the 32-wide block and the middle (4 x 4 x 64)
UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
# finetune.* settings of its training (steps from --unet-steps)
UNET_TRAINING = {
    "batch_size": 64,
    "lr": 1e-3,
    "warmup_steps": 100,
    "schedule": "cosine",
    "cond_dropout": 0.1,
    "ema_decay": 0.999,
    "checkpoint_every": 1_000_000,
    "log_every": 50,
}
CHECK_GUIDANCE = 4.0
CHECK_STEPS = 30
CHECK_PER_DIGIT = 4


def scheduler_config() -> dict:
    """digits-ddpm's DDPM schedule for latents: the same betas, ``clip_sample`` off and ``steps_offset`` 1
    (Stable Diffusion's values, which ``StableDiffusionPipeline`` would otherwise rewrite with a warning)."""
    config = json.loads(DIGITS_DDPM_SCHEDULER.read_text())
    return {**config, "clip_sample": False, "steps_offset": 1}


def train_unet(out: Path, args: argparse.Namespace) -> dict:
    """Train OUT's UNet with ``compressor.training.train`` on the digits' latents and captions as
    ``encode_dataset`` encodes them with OUT's VAE and text encoder; save its EMA weights to OUT/unet."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    parts = {  # OUT's saved components, as the pipeline will load them
        "vae": AutoencoderKL.from_pretrained(str(out / "vae")),
        "text_encoder": CLIPTextModel.from_pretrained(str(out / "text_encoder")).requires_grad_(False),
        "tokenizer": CLIPTokenizer.from_pretrained(str(out / "tokenizer")),
    }
    unet = build_unet({**UNET, "cross_attention_dim": args.text_hidden}, args.seed)
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    model = DiffusionModel(unet, scheduler, {"kind": "random", "architecture": "make_digits_sd"}, **parts)
    data_cfg = DataConfig()
    dataset = load_conditioned_dataset(data_cfg, channels=1, size=16, conditioning="text")
    cfg = FinetuneConfig(steps=args.unet_steps, **UNET_TRAINING)
    with tempfile.TemporaryDirectory() as tmp:
        encoded = encode_dataset(model, dataset, data_cfg, Path(tmp) / "run")
        noise_scheduler = DDPMScheduler.from_config(scheduler)
        with progress_bar(args.unet_steps, "[make_digits_sd] unet", "step") as bar:

            def on_step(step: int, loss: float, rate: float) -> None:
                bar.update(1)
                if step % 50 == 0:
                    bar.set_postfix(loss=f"{loss:.4f}", it_s=f"{rate:.1f}")

            started = time.monotonic()
            result = train(
                unet, noise_scheduler, encoded, cfg, Path(tmp) / "checkpoints", seed=args.seed,
                device=torch.device("cpu"), resume=False, on_step=on_step,
            )  # fmt: skip
            seconds = time.monotonic() - started
    result.ema_unet.save_pretrained(str(out / "unet"), safe_serialization=True)
    tail = [loss for _, loss in result.losses[-5:]]
    return {
        "parameters": sum(p.numel() for p in unet.parameters()),
        "config": {**UNET, "cross_attention_dim": args.text_hidden},
        "finetune": {"steps": args.unet_steps, **UNET_TRAINING},
        "latents": list(encoded.latents.shape),
        "caption_rows": int(encoded.text_embeddings.shape[0]),
        "saved": "EMA weights",
        "losses": result.losses,
        "final_loss": sum(tail) / len(tail) if tail else None,
        "steps_per_second": round(result.steps_per_second, 2),
        "seconds": round(seconds, 1),
    }


def digit_accuracy(images: torch.Tensor, digits: list[int]) -> tuple[float, list[int]]:
    """Share of ``images`` ((N, 1, 16, 16) in [0, 1]) the shipped digits classifier reads as ``digits``."""
    classifier = load_digits_features().eval()
    with torch.no_grad():
        predicted = classifier.logits(images.float()).argmax(1).tolist()
    return sum(p == d for p, d in zip(predicted, digits, strict=True)) / len(digits), predicted


def check_in_diffusers(out: Path, per_digit: int = CHECK_PER_DIGIT) -> dict:
    """Load OUT in diffusers' ``StableDiffusionPipeline`` and in the product's loop; generate
    ``per_digit`` images per digit prompt (DDIM, guidance 4) and classify them."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    digits = [d for d in range(10) for _ in range(per_digit)]
    prompts = [f"a handwritten digit {DIGIT_NAMES[d]}" for d in digits]
    pipe = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        images = pipe(
            prompts, num_inference_steps=CHECK_STEPS, guidance_scale=CHECK_GUIDANCE, output_type="pt",
            height=16, width=16, generator=torch.Generator().manual_seed(0),
        ).images  # fmt: skip
    diffusers_acc, diffusers_pred = digit_accuracy(images, digits)

    model = load_model(ModelConfig(name=str(out)))
    loop = generate(
        as_noise_predictor(model.unet), DDIMScheduler.from_config(model.scheduler_config),
        model.spec.sample_shape, len(prompts), CHECK_STEPS, conditioning=encode_prompts(model, prompts),
        guidance_scale=CHECK_GUIDANCE, decode=model_decoder(model),
    )  # fmt: skip
    loop_acc, loop_pred = digit_accuracy(loop, digits)
    return {
        "pipeline": type(pipe).__name__,
        "image_shape": list(images.shape[1:]),
        "tokens": pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer("a handwritten digit seven").input_ids),
        "sampler": f"DDIM {CHECK_STEPS} steps, guidance {CHECK_GUIDANCE}, {per_digit} images per digit",
        "accuracy_diffusers": diffusers_acc,
        "accuracy_loop": loop_acc,
        "predicted_diffusers": diffusers_pred,
        "predicted_loop": loop_pred,
    }


def main(argv: list[str] | None = None) -> int:
    """Build OUT's tokenizer, text encoder, VAE, scheduler, model_index.json and UNet; print a summary."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--vae-steps", type=int, default=600)
    parser.add_argument("--unet-steps", type=int, default=2000)
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
    }
    summary["unet"] = train_unet(out, args)
    summary["seconds"] = round(time.monotonic() - started, 1)
    if not args.no_check:
        summary["check"] = check_in_diffusers(out)
    (out / "make_digits_sd.json").write_text(json.dumps(summary, indent=2) + "\n")
    printed = {**summary, "unet": {k: v for k, v in summary["unet"].items() if k != "losses"}}
    print(json.dumps(printed, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
