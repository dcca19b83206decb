"""Conditioning for the sampling loop and classifier-free guidance, as diffusers' pipelines apply them.

A :class:`Conditioning` holds one batch's per-image conditioning and its unconditional
counterpart: text embeddings (``encoder_hidden_states``, (B, tokens, dim)) beside the negative
prompt's, or class labels (B,) beside the null class. :func:`compressor.sampling.denoise` feeds it
to the noise predictor as keyword arguments named like the UNet's (``predict(x, t,
encoder_hidden_states=...)`` or ``class_labels=...``).

Classifier-free guidance (Ho & Salimans 2022) follows ``StableDiffusionPipeline``: with a guidance
scale above 1 each step calls the predictor once on twice the batch, the unconditional half first,
and combines ``uncond + scale * (cond - uncond)``; at a scale of 1 or below the pipeline skips
guidance and predicts with the conditional half alone, and so does the loop (a scale below 1 is
not an interpolation towards the unconditional model there, nor here).

Text: :func:`encode_prompts` tokenizes and encodes exactly as ``StableDiffusionPipeline.encode_prompt``
(padding to the tokenizer's ``model_max_length``, truncation, the text encoder's
``last_hidden_state``; the empty prompt when no negative prompt is given).

Classes: a UNet's class table has no null entry by diffusers' convention (``UNet2DModel`` embeds
``class_labels`` through ``nn.Embedding(num_class_embeds, ...)``). The class-conditional models
trained for guidance reserve the table's last row for it: CompVis' LDM (``cin256``: 1001
embeddings, ``uc`` is class 1000) and DiT (``num_classes + 1`` rows, diffusers' ``DiTPipeline``
feeds 1000 as the null class). :func:`class_conditioning` takes ``num_class_embeds - 1`` as the
null class by default, so the model's real classes are ``0 .. num_class_embeds - 2``; a model
trained with another null label passes ``null_class``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from compressor.components import DiffusionModel
from compressor.errors import ConfigError, ModelError

INPUT_NAMES = {"text": "encoder_hidden_states", "class": "class_labels"}
# The scheduler-config key of a few-step student distilled from a guided teacher at a fixed scale
# (:mod:`compressor.step_distill`): the guidance is in its weights, so it is sampled on the conditional
# half alone (one UNet call a step at the images' batch), never guided again.
DISTILLED_GUIDANCE = "distilled_guidance_scale"


@dataclass(frozen=True)
class Conditioning:
    """One batch's conditioning, image ``i`` in row ``i``: ``cond`` (the prompts' embeddings or the
    class labels) and ``uncond`` (the negative prompts' embeddings or the null class), same shape.

    ``kind`` ``text``: float tensors (B, tokens, dim); ``class``: integer tensors (B,).
    """

    kind: Literal["text", "class"]
    cond: torch.Tensor
    uncond: torch.Tensor

    def __post_init__(self) -> None:
        if self.kind not in INPUT_NAMES:
            raise ConfigError(f"conditioning kind {self.kind!r}; choose text or class")
        if self.cond.shape != self.uncond.shape:
            raise ConfigError(
                f"{self.kind} conditioning: conditional {tuple(self.cond.shape)} and unconditional "
                f"{tuple(self.uncond.shape)} shapes differ"
            )
        dims = 3 if self.kind == "text" else 1
        if self.cond.dim() != dims or self.cond.shape[0] == 0:
            raise ConfigError(
                f"{self.kind} conditioning needs a non-empty {dims}-d tensor per batch, "
                f"got {tuple(self.cond.shape)}"
            )
        if self.kind == "class" and (self.cond.is_floating_point() or self.uncond.is_floating_point()):
            raise ConfigError("class conditioning needs integer class labels")

    @property
    def input_name(self) -> str:
        """The UNet's keyword for it: ``encoder_hidden_states`` or ``class_labels``."""
        return INPUT_NAMES[self.kind]

    def __len__(self) -> int:
        return int(self.cond.shape[0])

    def rows(self, start: int, stop: int) -> Conditioning:
        """Images ``start .. stop - 1`` (a batch of a longer run)."""
        return Conditioning(self.kind, self.cond[start:stop], self.uncond[start:stop])

    def inputs(
        self, guided: bool, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> dict[str, torch.Tensor]:
        """The predictor's keyword input: the unconditional rows then the conditional ones when
        ``guided`` (as diffusers concatenates them), else the conditional rows alone. Embeddings are
        cast to ``dtype`` (the sample's), labels stay integers."""
        value = torch.cat([self.uncond, self.cond]) if guided else self.cond
        value = value.to(device=device, dtype=dtype if self.kind == "text" else torch.long)
        return {self.input_name: value}


def uses_guidance(conditioning: Conditioning | None, guidance_scale: float) -> bool:
    """True when each step runs both halves: conditioning given and a scale above 1 (diffusers'
    ``do_classifier_free_guidance``)."""
    return conditioning is not None and guidance_scale > 1


def check_guidance(
    conditioning: Conditioning | None, guidance_scale: float, batch: int, cache_interval: int = 1
) -> None:
    """ConfigError for settings the loop cannot honour: a scale that is not a finite number >= 0,
    guidance without conditioning, conditioning for another batch size. ``cache_interval`` is
    accepted for the callers that pass it: feature reuse works with conditioning and guidance (both
    passes take the conditioning, on both halves under guidance)."""
    if not isinstance(guidance_scale, int | float) or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ConfigError(f"guidance_scale={guidance_scale!r}: use a finite number >= 0 (1 = no guidance)")
    if conditioning is None:
        if guidance_scale != 1:
            raise ConfigError(
                f"guidance_scale={guidance_scale} needs conditioning (prompts or class labels); "
                "an unconditional model samples with guidance_scale=1"
            )
        return
    if len(conditioning) != batch:
        raise ConfigError(f"conditioning for {len(conditioning)} images given for a batch of {batch}")


def distilled_scale(scheduler_or_config) -> float | None:
    """The guidance scale a few-step student was distilled at (its scheduler config's
    :data:`DISTILLED_GUIDANCE`, kept on the scheduler :func:`compressor.sampling.make_scheduler` builds
    from it), None for any other model's schedule."""
    if isinstance(scheduler_or_config, dict):
        value = scheduler_or_config.get(DISTILLED_GUIDANCE)
    else:
        value = getattr(scheduler_or_config, DISTILLED_GUIDANCE, None)
    return None if value is None else float(value)


def sampled_guidance(scheduler, guidance_scale: float) -> float:
    """The scale the loop guides with: ``guidance_scale``, or 1 (the conditional half alone) for a
    student whose schedule says it was distilled at a fixed scale (:func:`distilled_scale`): guiding
    it again would apply the guidance twice."""
    return 1.0 if distilled_scale(scheduler) is not None else guidance_scale


def combine(prediction: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance of a prediction over the doubled batch (unconditional half first)."""
    uncond, cond = prediction.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def _as_list(texts: str | Sequence[str], what: str) -> list[str]:
    out = [texts] if isinstance(texts, str) else list(texts)
    if not all(isinstance(t, str) for t in out):
        raise ConfigError(f"{what}: give a string or a list of strings")
    return out


def _encode(model: DiffusionModel, texts: list[str], max_length: int, device: torch.device) -> torch.Tensor:
    """``StableDiffusionPipeline.encode_prompt``'s tokenization and encoding (no clip skip)."""
    encoder = model.text_encoder
    tokens = model.tokenizer(
        texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    )
    mask = None
    if getattr(encoder.config, "use_attention_mask", False):
        mask = tokens.attention_mask.to(device)
    with torch.inference_mode():
        hidden = encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
    return hidden.to(dtype=encoder.dtype, device=device)


def encode_prompts(
    model: DiffusionModel,
    prompts: str | Sequence[str],
    negative_prompt: str | Sequence[str] = "",
    device: torch.device | str | None = None,
) -> Conditioning:
    """Text conditioning for one image per prompt: the prompts' and the negative prompts' encodings.

    ``negative_prompt``: one string for every image (default the empty prompt, what diffusers uses
    without one) or one per prompt. ``device``: where the embeddings go (default the text
    encoder's). ModelError for a model without a text encoder and tokenizer.
    """
    if model.text_encoder is None or model.tokenizer is None:
        raise ModelError("encode_prompts: the model has no text encoder and tokenizer (not text-conditioned)")
    texts = _as_list(prompts, "prompts")
    if not texts:
        raise ConfigError("encode_prompts: no prompts given")
    negatives = (
        [negative_prompt] * len(texts)
        if isinstance(negative_prompt, str)
        else _as_list(negative_prompt, "negative_prompt")
    )
    if len(negatives) != len(texts):
        raise ConfigError(f"{len(negatives)} negative prompts for {len(texts)} prompts; give one or one each")
    device = torch.device(device) if device is not None else next(model.text_encoder.parameters()).device
    cond = _encode(model, texts, model.tokenizer.model_max_length, device)
    uncond = _encode(model, negatives, cond.shape[1], device)
    return Conditioning("text", cond, uncond)


def class_conditioning(
    model: DiffusionModel, labels: int | Sequence[int] | torch.Tensor, null_class: int | None = None
) -> Conditioning:
    """Class conditioning for one image per label; the unconditional half is ``null_class``
    (default ``num_class_embeds - 1``: see the module docstring). ConfigError for a label outside
    the UNet's class table, ModelError for a model without one."""
    classes = model.num_classes
    if classes is None:
        raise ModelError("class_conditioning: the UNet has no class embeddings (num_class_embeds)")
    null = classes - 1 if null_class is None else int(null_class)
    cond = torch.as_tensor([labels] if isinstance(labels, int) else labels, dtype=torch.long).reshape(-1)
    for name, values in (("label", cond), ("null_class", torch.tensor([null]))):
        bad = values[(values < 0) | (values >= classes)]
        if bad.numel():
            raise ConfigError(
                f"{name} {int(bad[0])}: the UNet has {classes} class embeddings (0..{classes - 1})"
            )
    return Conditioning("class", cond, torch.full_like(cond, null))


def vae_decoder(vae: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``latents -> images in [-1, 1]``: ``vae.decode(latents / scaling_factor)`` as diffusers' pipelines
    decode, plus the VAE's ``shift_factor`` where it has one (as SD3's pipeline does); the sampling
    loop then maps to [0, 1]."""
    vq = type(vae).__name__ == "VQModel"  # LDMPipeline: vqvae.decode(latents), unscaled, quantized
    scale = 1.0 if vq else float(vae.config.scaling_factor)
    shift = None if vq else getattr(vae.config, "shift_factor", None)
    dtype = next(vae.parameters()).dtype

    def decode(latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(dtype) / scale
        if shift is not None:
            latents = latents + shift
        with torch.inference_mode():
            return vae.decode(latents, return_dict=False)[0]

    return decode


def model_decoder(model: DiffusionModel) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The decoder of a latent model's samples (its VAE), None for a pixel model."""
    return None if model.vae is None else vae_decoder(model.vae)
