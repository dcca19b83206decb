"""Conditioned training batches: what the training loop takes from text- or class-conditioned data,
and the conditioning dropout that teaches one UNet both halves of classifier-free guidance.

Conditioned data is anything with ``len``, ``samples(indices)`` (the denoiser's clean inputs:
latents of a latent model, pixels of a pixel one) and ``conditions(indices)`` (the UNet's keyword
inputs, ``encoder_hidden_states`` (B, tokens, width) and/or ``class_labels`` (B,)):
:class:`~compressor.encoded_cache.EncodedData` for a latent model, :class:`PixelConditions` (the
pixels of an image dataset beside an ``EncodedData``'s conditioning) for a pixel-space one.

Conditioning dropout (``finetune.cond_dropout``, Stable Diffusion's and BK-SDM's practice, 0.1 in
their recipes): each image of a batch loses its condition with that probability; a caption becomes
the empty prompt (the text table's row 0, :attr:`EncodedData.null_embedding`), a class becomes the
null class ``num_class_embeds - 1`` (the convention :func:`compressor.guidance.class_conditioning`
samples with). The one model then predicts the noise both with and without its condition, which
classifier-free guidance combines at sampling time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from compressor.errors import ConfigError, DataError
from compressor.models import is_conditional


@runtime_checkable
class ConditionedSamples(Protocol):
    """Training data with conditioning: clean samples and the UNet's conditioning inputs by index."""

    def __len__(self) -> int: ...

    def samples(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor: ...

    def conditions(self, indices: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]: ...


@dataclass
class PixelConditions:
    """A pixel-space model's conditioned data: ``images`` (indexable, items (C, H, W) in [-1, 1]) as
    samples, ``encoded`` (an :class:`~compressor.encoded_cache.EncodedData` without latents) as
    conditioning, item for item."""

    images: Any
    encoded: Any

    def __post_init__(self) -> None:
        if len(self.images) != len(self.encoded):
            raise DataError(
                f"{len(self.images)} images but {len(self.encoded)} conditions: "
                "encode the same dataset the images come from"
            )

    def __len__(self) -> int:
        return len(self.images)

    @property
    def null_embedding(self) -> torch.Tensor | None:
        """The empty prompt's embedding (1, tokens, width), None without text conditioning."""
        return getattr(self.encoded, "null_embedding", None)

    def samples(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """The pixels of items ``indices`` (N, C, H, W)."""
        return torch.stack([self.images[int(i)] for i in indices])

    def conditions(self, indices: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        """The conditioning inputs of items ``indices``."""
        return self.encoded.conditions(indices)


@dataclass
class NullCondition:
    """What a dropped condition becomes: the empty prompt's embedding (1, tokens, width) and/or the
    null class."""

    text: torch.Tensor | None = None
    label: int | None = None


def _num_classes(unet: nn.Module) -> int | None:
    n = getattr(getattr(unet, "config", None), "get", lambda _k: None)("num_class_embeds")
    return int(n) if n else None


def null_condition(unet: nn.Module, data: ConditionedSamples) -> NullCondition:
    """The null condition of ``unet`` trained on ``data``, after checking that ``data`` conditions it
    as it takes conditioning (ConfigError otherwise, before any step)."""
    given = set(data.conditions([0]))
    wants = set()
    if is_conditional(unet):
        wants.add("encoder_hidden_states")
    classes = _num_classes(unet)
    if classes:
        wants.add("class_labels")
    if not wants:
        raise ConfigError(
            "conditioned training data given to an unconditional UNet (no cross-attention, no "
            "num_class_embeds); pass the images dataset instead"
        )
    if given != wants:
        raise ConfigError(
            f"the UNet takes {', '.join(sorted(wants))} "
            f"but the data gives {', '.join(sorted(given)) or 'none'}"
        )
    null = NullCondition()
    if "encoder_hidden_states" in wants:
        text = getattr(data, "null_embedding", None)
        if text is None:
            raise ConfigError("text-conditioned data without the empty prompt's embedding (null_embedding)")
        width = unet.config.cross_attention_dim
        if text.shape[-1] != width:
            raise ConfigError(
                f"text embeddings of width {text.shape[-1]}, but the UNet's cross_attention_dim is {width}; "
                "encode the captions with the model's own text encoder"
            )
        null.text = text
    if classes:
        if classes < 2:
            raise ConfigError(f"num_class_embeds={classes} leaves no class beside the null class")
        null.label = classes - 1
        labels = getattr(data, "labels", None)
        if labels is not None:
            check_labels(labels, null.label)
    return null


def check_labels(labels: torch.Tensor, null_label: int) -> None:
    """DataError unless every label is a real class, 0 .. ``null_label`` - 1."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= null_label):
        raise DataError(
            f"class labels must lie in 0..{null_label - 1}: class {null_label} (num_class_embeds - 1) "
            "is the null class of classifier-free guidance; give the UNet one more class embedding"
        )


def drop_conditions(
    conditions: dict[str, torch.Tensor], drop: torch.Tensor, null: NullCondition
) -> dict[str, torch.Tensor]:
    """``conditions`` with the rows where ``drop`` (B,) is True replaced by the null condition."""
    out = dict(conditions)
    if "encoder_hidden_states" in out and null.text is not None:
        states = out["encoder_hidden_states"]
        empty = null.text.to(states.dtype).expand_as(states)
        out["encoder_hidden_states"] = torch.where(drop[:, None, None], empty, states)
    if "class_labels" in out and null.label is not None:
        labels = out["class_labels"]
        check_labels(labels, null.label)
        out["class_labels"] = torch.where(drop, torch.full_like(labels, null.label), labels)
    return out
