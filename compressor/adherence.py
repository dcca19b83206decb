"""Prompt adherence of a conditional model's images: does image ``i`` show what its prompt asks for?

Two measures, one per image, so every figure has a paired interval over the seeds like the quality
stage's others (:mod:`compressor.intervals`: image ``i`` of every model comes from the same seed
and the same prompt):

* ``digits_accuracy`` (the digits demo): the shipped digits classifier
  (:func:`compressor.features.load_digits_features`, the network whose features give ``fd_digits``)
  predicts the digit the prompt names (:attr:`compressor.prompts.PromptSet.digits`); an image scores
  1 or 0, the figure is the fraction of images showing their prompted digit.
* ``clip_score`` (``quality.clip_model``: a local ``CLIPModel`` folder with its tokenizer and image
  processor): ``100 * max(cos(image embedding, prompt embedding), 0)`` per image, as torchmetrics'
  ``CLIPScore`` defines it (Hessel et al. 2021). torchmetrics takes only hub names (or a callable) and
  averages before clamping, so the per-image score is computed here with transformers directly, on
  the same embeddings (a test holds it to torchmetrics' ``clip_score`` image by image).

When neither applies (a prompt naming no digit, non-digit images, no ``clip_model``), the record says
so with the reason (:func:`choose_adherence`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from compressor.errors import ConfigError, ModelError
from compressor.features import load_digits_features
from compressor.intervals import Resampling
from compressor.prompts import PromptSet

DIGITS, CLIP = "digits_accuracy", "clip_score"
IMAGE_BATCH = 256


@dataclass(frozen=True)
class AdherenceMeasure:
    """How a run's images are scored for prompt adherence: ``metric`` (``digits_accuracy`` or
    ``clip_score``; None when no measure applies, ``note`` says why) and ``score(images, start)``, the
    per-image scores (float64, one per image) of images ``start ..`` in [0, 1] (n, c, h, w)."""

    metric: str | None
    note: str
    score: Callable[[torch.Tensor, int], torch.Tensor] | None = None

    def figures(
        self, boot: Resampling, scores: torch.Tensor | None, dense: torch.Tensor | None = None
    ) -> dict:
        """A model's record entries: ``adherence`` (the mean score) and ``adherence_ci`` (its interval
        over the seeds), ``adherence_metric``; against ``dense``'s scores on the same seeds also
        ``adherence_ratio`` (compressed / dense) and its paired interval. None when no measure applies,
        with ``adherence_note``."""
        if self.metric is None or scores is None:
            return {
                "adherence": None,
                "adherence_ci": None,
                "adherence_metric": None,
                "adherence_note": self.note,
            }
        out = {"adherence_metric": self.metric, **mean_figures(boot, scores, "adherence")}
        if dense is not None:
            out.update(ratio_figures(boot, scores, dense))
        return out


def mean_figures(boot: Resampling, scores: torch.Tensor, key: str) -> dict:
    """``key``: the mean of per-image ``scores`` and ``<key>_ci``: its interval over the seeds."""
    scores = scores.double()
    value = float(scores.mean())
    return {key: value, f"{key}_ci": boot.interval(value, _replicates(boot, scores))}


def ratio_figures(boot: Resampling, scores: torch.Tensor, dense: torch.Tensor) -> dict:
    """``adherence_ratio``: mean of ``scores`` / mean of ``dense`` (image ``i`` of both from the same
    seed and prompt) and its paired interval; the interval is null, and ``adherence_ratio_note`` says
    why, when the dense model's own interval reaches zero (the ratio is then ill-conditioned)."""
    if scores.shape != dense.shape:
        raise ValueError("paired adherence needs both models scored on the same seeds")
    a, d = scores.double(), dense.double()
    mean_d = float(d.mean())
    ratio = float(a.mean()) / mean_d if mean_d > 0 else float("nan")
    reps_d = _replicates(boot, d)
    dense_ci = boot.interval(mean_d, reps_d)
    if dense_ci[0] > 0 and bool((reps_d > 0).all()):
        return {
            "adherence_ratio": ratio,
            "adherence_ratio_ci": boot.interval(ratio, _replicates(boot, a) / reps_d),
        }
    return {
        "adherence_ratio": ratio if mean_d > 0 else None,
        "adherence_ratio_ci": None,
        "adherence_ratio_note": (
            f"ill-conditioned: the dense model's adherence interval [{dense_ci[0]:.3g}, {dense_ci[1]:.3g}] "
            "reaches zero, so the ratio has no interval"
        ),
    }


def _replicates(boot: Resampling, scores: torch.Tensor) -> torch.Tensor:
    counts = boot.counts(scores.shape[0])
    return counts @ scores / counts.sum(1)


# -- the digits classifier ----------------------------------------------------------------------------


def digits_scores(classifier: torch.nn.Module, images: torch.Tensor, digits: list[int]) -> torch.Tensor:
    """1.0 where the digits classifier's prediction on image ``i`` (in [0, 1], any channel count) is
    ``digits[i]``, else 0.0 (float64)."""
    if len(digits) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(digits)} prompted digits")
    device = next(classifier.parameters()).device
    with torch.no_grad():
        predicted = torch.cat(
            [
                classifier.logits(_grey(b.float()).to(device)).argmax(1).cpu()
                for b in images.split(IMAGE_BATCH)
            ]
        )
    return (predicted == torch.tensor(digits)).double()


def _grey(x: torch.Tensor) -> torch.Tensor:
    return x.mean(1, keepdim=True) if x.shape[1] != 1 else x


# -- CLIP score -----------------------------------------------------------------------------------------


def load_clip(folder: str | Path, device: torch.device | str = "cpu"):
    """``(CLIPModel, CLIPProcessor)`` from a local folder (offline), the model in eval mode on ``device``;
    ConfigError when the folder is missing, ModelError when it holds no loadable CLIP model."""
    from transformers import CLIPModel, CLIPProcessor

    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"quality.clip_model={str(folder)!r}: no such folder; point it at a local CLIPModel folder "
            "(save_pretrained's output with its tokenizer and image processor)"
        )
    try:
        model = CLIPModel.from_pretrained(str(path), local_files_only=True)
        processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"quality.clip_model={str(folder)!r}: not a loadable CLIPModel folder with its tokenizer and "
            f"image processor ({first}); save one with CLIPModel and CLIPProcessor's save_pretrained"
        ) from None
    return model.to(device).eval().requires_grad_(False), processor


def _embedding(out) -> torch.Tensor:
    """The projected embedding of ``get_image_features`` / ``get_text_features`` (a tensor, or an
    output whose ``pooler_output`` holds it in newer transformers)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def clip_scores(model, processor, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """``100 * max(cos(image embedding, prompt embedding), 0)`` of each image (in [0, 1], grey or RGB)
    and its prompt, float64; images go to the processor as 0..255 RGB, as torchmetrics hands them."""
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
    device = next(model.parameters()).device
    longest = min(processor.tokenizer.model_max_length, model.config.text_config.max_position_embeddings)
    out = []
    with torch.no_grad():
        for start in range(0, images.shape[0], IMAGE_BATCH):
            batch = images[start : start + IMAGE_BATCH].float().clamp(0, 1)
            rgb = (batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch[:, :3]) * 255
            pixels = processor(images=list(rgb.round().to(torch.uint8)), return_tensors="pt")["pixel_values"]
            text = processor(
                text=prompts[start : start + IMAGE_BATCH],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=longest,
            )
            img = _embedding(model.get_image_features(pixel_values=pixels.to(device)))
            txt = _embedding(
                model.get_text_features(
                    input_ids=text["input_ids"].to(device), attention_mask=text["attention_mask"].to(device)
                )
            )
            cos = torch.nn.functional.cosine_similarity(img.double(), txt.double(), dim=-1)
            out.append((100 * cos).clamp(min=0).cpu())
    return torch.cat(out)


# -- which measure a run takes -------------------------------------------------------------------------------


def choose_adherence(
    prompts: PromptSet, clip_model: str | None, digit_images: bool, device: torch.device | str = "cpu"
) -> AdherenceMeasure:
    """The run's adherence measure: CLIP score when ``clip_model`` is set and the prompts are text; else
    the digits classifier's accuracy when the images are digits (``digit_images``: the run's Frechet
    features are the digits network's) and every prompt names a digit; else none, with the reason."""
    why = []
    if clip_model is not None:
        if prompts.kind == "text":
            model, processor = load_clip(clip_model, device)
            return AdherenceMeasure(
                CLIP,
                f"CLIP score of each image with its prompt ({clip_model})",
                lambda images, start: clip_scores(
                    model, processor, images, prompts.for_images(len(images), start)
                ),
            )
        why.append("quality.clip_model scores text prompts, and this model is class-conditioned")
    else:
        why.append("quality.clip_model is not set (a local CLIPModel folder gives CLIP score)")
    digits = prompts.digits
    missing = [p for p, d in zip(prompts.prompts, digits, strict=True) if d is None]
    if not digit_images:
        why.append("the images are not digits (the digits classifier scores digits data only)")
    elif missing:
        why.append(f"prompt {missing[0]!r} names no digit for the digits classifier")
    else:
        classifier = load_digits_features().to(device)
        return AdherenceMeasure(
            DIGITS,
            "the digits classifier's accuracy on each image's prompted digit",
            lambda images, start: digits_scores(
                classifier, images, [digits[(start + i) % len(digits)] for i in range(len(images))]
            ),
        )
    return AdherenceMeasure(None, "prompt adherence not measured: " + "; ".join(why))
