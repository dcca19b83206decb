"""``prune_unet``: a UNet pruned by its config, and the record of what was done.

The ratio (given, searched for a MACs/params target, or allocated per level under a latency
target by :mod:`compressor.pruning.search`), the Taylor pass (:mod:`compressor.taylor`), the
structural pruning (:mod:`compressor.pruning.structure`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from compressor.channels import channel_widths, kept_channels
from compressor.config import PruneConfig
from compressor.errors import ConfigError
from compressor.models import count_macs_params
from compressor.pruning.search import search_ratio
from compressor.pruning.structure import (
    check_conditional_structure,
    conditioning_widths,
    layer_widths,
    prune_structure,
    reinitialize,
    stem_ratio,
    uses_whole_heads,
)
from compressor.taylor import TaylorPass, accumulate_taylor_grads, candidate_timesteps, make_importance


@dataclass
class PruneResult:
    """A pruned UNet and everything needed to describe and replay it."""

    unet: nn.Module
    ratio: float
    history: list
    kept_widths: dict[str, list[int]]
    taylor: TaylorPass | None = None
    search: list[dict] = field(default_factory=list)
    kept_channels: dict[str, str] = field(default_factory=dict)
    level_ratios: dict[int, float] | None = None
    importance_kept: float | None = None


def prune_unet(
    unet: nn.Module,
    noise_scheduler,
    images: torch.Tensor | None,
    cfg: PruneConfig,
    seed: int,
    on_taylor_step: Callable[[int, float], None] | None = None,
    on_search_trial: Callable[[float, float, float], None] | None = None,
    allocate: Callable[[nn.Module, object], dict[int, float]] | None = None,
    conditioning: dict[str, torch.Tensor] | None = None,
) -> PruneResult:
    """Prune ``unet`` in place by ``cfg`` (method, target) and describe what was done.

    ``images``: the Taylor pass's clean samples (pixels, or latents of a latent model);
    ``conditioning``: a conditional UNet's inputs for them, item for item (``encoder_hidden_states``
    and/or ``class_labels``, e.g. :meth:`compressor.encoded_cache.EncodedData.conditions`), passed
    to every call of the pass; a MACs target counts one call with a context of their token count.
    The structural rules for conditional UNets are :func:`compressor.pruning.structure.build_pruner`'s
    and are checked after pruning (:func:`compressor.pruning.structure.check_conditional_structure`).

    ``allocate(unet, importance)``, when given, is called after the Taylor pass and
    returns a ratio per resolution level (hardware-aware allocation); it replaces the
    uniform ratio of ``cfg``.
    """
    dense_widths = layer_widths(unet)
    search: list[dict] = []
    ratio = 0.0  # with ``allocate``: decided after the Taylor pass
    if allocate is None:
        cfg.require_target()
        if cfg.ratio is not None:
            ratio = cfg.ratio
        else:
            metric = "macs" if cfg.target_macs is not None else "params"
            target = cfg.target_macs if cfg.target_macs is not None else cfg.target_params
            tokens = context_tokens(conditioning)
            dense = count_macs_params(unet, tokens)
            ratio, search = search_ratio(
                unet,
                target,
                metric,
                cfg.round_to,
                dense,
                cfg.search,
                on_trial=on_search_trial,
                tokens=tokens,
                heads=cfg.attention_heads,
            )
    taylor = None
    if cfg.method in ("diff-pruning", "taylor"):
        if images is None:
            raise ConfigError(f"prune.method={cfg.method} needs training images for the Taylor pass")
        g = torch.Generator().manual_seed(seed)
        x0 = images[: cfg.batch_size]
        cond = None if conditioning is None else {k: v[: cfg.batch_size] for k, v in conditioning.items()}
        noise = torch.randn(x0.shape, generator=g).to(x0.device)
        candidates = candidate_timesteps(
            noise_scheduler.config.num_train_timesteps, cfg.timestep_stride, cfg.max_timesteps
        )
        threshold = cfg.threshold if cfg.method == "diff-pruning" else 0.0
        unet.eval()  # no dropout noise in the importance estimate
        taylor = accumulate_taylor_grads(
            unet,
            noise_scheduler,
            x0,
            noise,
            candidates,
            threshold,
            on_taylor_step,
            cfg.diagnose,
            kept_layers=(unet.conv_out,) if hasattr(unet, "conv_out") else (),
            conditioning=cond,
        )
    dense_inputs = conditioning_widths(unet)
    dense_channels = channel_widths(unet)
    importance = make_importance(cfg.method, cfg)
    level_ratios = None
    if allocate is not None:
        level_ratios = allocate(unet, importance)
        ratio = stem_ratio(level_ratios)
    stats: dict = {}
    whole = uses_whole_heads(unet, cfg.attention_heads)
    history = prune_structure(
        unet, importance, ratio, cfg.round_to, seed, cfg.group_selection, level_ratios, stats, whole
    )
    check_conditional_structure(unet, dense_inputs)
    kept_importance = None if cfg.method in ("random", "reinit") else stats.get("importance_kept")
    unet.zero_grad(set_to_none=True)
    if cfg.method == "reinit":
        reinitialize(unet, seed)
    kept = layer_widths(unet)
    widths = {name: [dense_widths[name], kept[name]] for name in kept}
    channels = kept_channels(history, dense_channels)
    return PruneResult(unet, ratio, history, widths, taylor, search, channels, level_ratios, kept_importance)


def context_tokens(conditioning: dict[str, torch.Tensor] | None) -> int | None:
    """The token count of ``encoder_hidden_states`` in ``conditioning`` (None without text)."""
    ctx = (conditioning or {}).get("encoder_hidden_states")
    return None if ctx is None else int(ctx.shape[1])
