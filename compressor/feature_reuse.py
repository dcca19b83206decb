"""DeepCache-style feature reuse: a full UNet pass that also returns a deep feature, and a
shallow pass that reuses it (Ma, Fang, Wang, CVPR 2024).

The features that reach the shallow up blocks through the main branch change slowly
between adjacent sampling steps. A *full* pass runs the whole UNet and returns the noise
and the hidden state entering the up block of resolution level ``level`` (the boundary
skip branch); a *shallow* pass runs only ``conv_in``, the down blocks up to ``level``,
the up blocks from ``level`` to the output, and takes the deep feature from the cache.
The sampling loop (:func:`compressor.sampling.denoise`) calls the full pass at the steps
:func:`full_steps` names and the shallow pass otherwise; interval 1 is the plain sampler.

Both passes are written against the UNet's own blocks (diffusers' ``UNet2DModel`` and
``UNet2DConditionModel``), so they work on pruned models, whose widths differ per level,
and export to ONNX as two graphs. Conditioned UNets pass their conditioning to both passes as their
own call takes it (``encoder_hidden_states`` for cross-attention, ``class_labels`` for a class
embedding); under classifier-free guidance the sampler calls each pass once a step on both halves
(twice the batch) and the cached feature holds both halves' rows. Configurations the split does not
cover (projected class embeddings, skip-connection blocks, added embeddings) raise ConfigError.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from compressor.errors import ConfigError
from compressor.models import null_context

SCHEDULES = ("uniform", "quadratic")


def num_levels(unet: nn.Module) -> int:
    """Resolution levels of ``unet`` (one per down block)."""
    return len(unet.down_blocks)


def check_level(unet: nn.Module, level: int) -> None:
    """Raise ConfigError unless ``level`` is a usable boundary of ``unet`` (0 .. levels - 2)."""
    top = num_levels(unet) - 2
    if not 0 <= level <= top:
        raise ConfigError(
            f"sample.cache_level={level}: this UNet has {num_levels(unet)} levels, so the boundary must be "
            f"in 0..{top} (0, the shallowest, is DeepCache's default)"
        )


def full_steps(steps: int, interval: int, schedule: str = "uniform") -> list[int]:
    """The step indices (0-based) at which the full pass runs; the first step is always one.

    ``uniform``: every ``interval``-th step (DeepCache's uniform schedule). ``quadratic``:
    the same number of full steps, spaced quadratically so they are denser early in the
    reverse process, where features change fastest (DeepCache's non-uniform idea).
    """
    if interval < 1:
        raise ConfigError(f"sample.cache_interval={interval}: must be >= 1")
    if schedule not in SCHEDULES:
        raise ConfigError(f"sample.cache_schedule={schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if interval == 1:
        return list(range(steps))
    count = math.ceil(steps / interval)
    if schedule == "uniform":
        return list(range(0, steps, interval))
    picks: list[int] = []
    for j in range(count):  # quadratic positions, kept distinct and in range
        at = max(int((j / count) ** 2 * steps), picks[-1] + 1 if picks else 0)
        if at < steps:
            picks.append(at)
    return picks


class FeatureReuseUNet(nn.Module):
    """The two passes of one UNet split at ``level``: :meth:`full` and :meth:`shallow`.

    Holds the UNet it is given (no copy: wrap a copy to keep the original untouched).
    ``forward`` is the full pass, so the module exports as the full graph; the shallow
    graph is exported from :class:`ShallowPass`.
    """

    def __init__(self, unet: nn.Module, level: int = 0) -> None:
        super().__init__()
        _check_supported(unet)
        check_level(unet, level)
        self.unet = unet
        self.level = level
        self.conditional = type(unet).__name__ == "UNet2DConditionModel"
        n = num_levels(unet)
        self.shallow_up = list(range(n - 1 - level, n))  # up-block indices the shallow pass runs

    # -- shared pieces ----------------------------------------------------------------------

    def _embed(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
    ):
        """(sample after input centring, time (+ class) embedding, encoder hidden states or None), as
        the UNet's own forward computes them: a conditional UNet takes the prompts' embeddings when
        given (else its fixed null context), a class-conditional one adds its class embedding."""

        u = self.unet
        if timestep.dim() == 0:
            timestep = timestep.expand(sample.shape[0])
        if u.config.center_input_sample:
            sample = 2 * sample - 1.0
        if self.conditional:
            t_emb = u.get_time_embed(sample=sample, timestep=timestep)
            emb = u.time_embedding(t_emb, None)
            class_emb = u.get_class_embed(sample=sample, class_labels=class_labels)
            if class_emb is not None:
                emb = emb + class_emb
            if u.time_embed_act is not None:
                emb = u.time_embed_act(emb)
            ctx = encoder_hidden_states
            if ctx is None:
                ctx = null_context(u, sample.shape[0], sample.device).to(sample.dtype)
            ctx = u.process_encoder_hidden_states(encoder_hidden_states=ctx, added_cond_kwargs={})
            return sample, emb, ctx
        timesteps = timestep * torch.ones(sample.shape[0], dtype=timestep.dtype, device=timestep.device)
        emb = u.time_embedding(u.time_proj(timesteps).to(dtype=sample.dtype))
        if u.class_embedding is not None:
            if class_labels is None:
                raise ConfigError("feature reuse: this UNet is class-conditional; pass class_labels")
            if u.config.class_embed_type == "timestep":
                class_labels = u.time_proj(class_labels)
            emb = emb + u.class_embedding(class_labels).to(dtype=emb.dtype)
        return sample, emb, None

    def _down(self, block: nn.Module, sample, emb, ctx):
        if getattr(block, "has_cross_attention", False):
            return block(hidden_states=sample, temb=emb, encoder_hidden_states=ctx)
        return block(hidden_states=sample, temb=emb)

    def _up(self, block: nn.Module, sample, res, emb, ctx, upsample_size):
        if self.conditional:
            if getattr(block, "has_cross_attention", False):
                return block(
                    hidden_states=sample,
                    temb=emb,
                    res_hidden_states_tuple=res,
                    encoder_hidden_states=ctx,
                    upsample_size=upsample_size,
                )
            return block(
                hidden_states=sample, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size
            )
        return block(sample, res, emb)

    def _upsample_size_needed(self, sample: torch.Tensor) -> bool:
        factor = 2 ** sum(1 for b in self.unet.up_blocks if getattr(b, "upsamplers", None))
        return self.conditional and any(s % factor != 0 for s in sample.shape[-2:])

    def _ups(self, indices, sample, res_samples, emb, ctx, forward_size: bool):
        """Run up blocks ``indices`` (in order) consuming residuals from the end of ``res_samples``."""
        blocks = self.unet.up_blocks
        for i in indices:
            block = blocks[i]
            res = res_samples[-len(block.resnets) :]
            res_samples = res_samples[: -len(block.resnets)]
            size = res_samples[-1].shape[2:] if forward_size and i < len(blocks) - 1 else None
            sample = self._up(block, sample, res, emb, ctx, size)
        return sample, res_samples

    def _out(self, sample: torch.Tensor) -> torch.Tensor:
        u = self.unet
        if u.conv_norm_out is not None:
            sample = u.conv_act(u.conv_norm_out(sample))
        return u.conv_out(sample)

    # -- the two passes ---------------------------------------------------------------------

    def full(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise, the feature entering the boundary up block): the whole UNet, once. A conditioned
        UNet takes its conditioning as its own call does (under guidance: both halves, twice the batch;
        the feature then holds both halves' rows too)."""
        u = self.unet
        forward_size = self._upsample_size_needed(sample)
        sample, emb, ctx = self._embed(sample, timestep, encoder_hidden_states, class_labels)
        sample = u.conv_in(sample)
        res_samples: tuple = (sample,)
        for block in u.down_blocks:
            sample, res = self._down(block, sample, emb, ctx)
            res_samples += res
        if u.mid_block is not None:
            if getattr(u.mid_block, "has_cross_attention", False):
                sample = u.mid_block(sample, emb, encoder_hidden_states=ctx)
            else:
                sample = u.mid_block(sample, emb)
        deep = range(0, self.shallow_up[0])
        sample, res_samples = self._ups(deep, sample, res_samples, emb, ctx, forward_size)
        feature = sample
        sample, _ = self._ups(self.shallow_up, sample, res_samples, emb, ctx, forward_size)
        return self._out(sample), feature

    def shallow(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        feature: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The noise from the levels above the boundary, the deep part taken from ``feature`` (cached by
        the last full pass on the same rows and conditioning)."""
        u = self.unet
        forward_size = self._upsample_size_needed(sample)
        sample, emb, ctx = self._embed(sample, timestep, encoder_hidden_states, class_labels)
        sample = u.conv_in(sample)
        res_samples: tuple = (sample,)
        for block in u.down_blocks[: self.level + 1]:
            sample, res = self._down(block, sample, emb, ctx)
            res_samples += res
        needed = sum(len(u.up_blocks[i].resnets) for i in self.shallow_up)
        out, _ = self._ups(
            self.shallow_up, feature.to(sample.dtype), res_samples[:needed], emb, ctx, forward_size
        )
        return self._out(out)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The full pass (what the full ONNX graph computes)."""
        return self.full(sample, timestep, encoder_hidden_states, class_labels)


class ShallowPass(nn.Module):
    """``forward(sample, timestep, feature) -> noise``: the shallow graph of a :class:`FeatureReuseUNet`."""

    def __init__(self, split: FeatureReuseUNet) -> None:
        super().__init__()
        self.split = split

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        feature: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The shallow pass."""
        return self.split.shallow(sample, timestep, feature, encoder_hidden_states, class_labels)


def _check_supported(unet: nn.Module) -> None:
    """ConfigError for UNet features the split does not cover."""
    kind = type(unet).__name__
    if kind not in ("UNet2DModel", "UNet2DConditionModel"):
        raise ConfigError(
            f"feature reuse: {kind} is not supported (UNet2DModel and UNet2DConditionModel are)"
        )
    cfg = unet.config
    unsupported = []
    class_type = cfg.get("class_embed_type")
    plain_classes = (None, "timestep", "identity")  # what UNet2DModel embeds; the conditional UNet's own
    if kind == "UNet2DModel" and unet.class_embedding is not None and class_type not in plain_classes:
        unsupported.append(f"class_embed_type={class_type}")
    if kind == "UNet2DConditionModel" and cfg.get("class_embeddings_concat"):
        unsupported.append("class_embeddings_concat")
    if any(hasattr(b, "skip_conv") for b in [*unet.down_blocks, *unet.up_blocks]):
        unsupported.append("skip-connection blocks")
    if kind == "UNet2DModel" and cfg.time_embedding_type != "positional":
        unsupported.append(f"time_embedding_type={cfg.time_embedding_type}")
    if kind == "UNet2DConditionModel" and cfg.get("addition_embed_type"):
        unsupported.append(f"addition_embed_type={cfg.addition_embed_type}")
    if unsupported:
        raise ConfigError(
            f"feature reuse: this UNet uses {', '.join(unsupported)}; set sample.cache_interval=1"
        )
