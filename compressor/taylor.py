"""The Taylor pass of Diff-Pruning and the importance it feeds (split from :mod:`compressor.pruning`).

1. :func:`candidate_timesteps` - which timesteps the Taylor pass may visit.
2. :func:`accumulate_taylor_grads` - one forward + backward per timestep, low noise first,
   accumulating gradients and stopping once ``L_t < T * L_max`` (:func:`threshold_reached`;
   the crossing step is included, as in the paper's code).
3. :func:`make_importance` - the torch-pruning importance for a method (:class:`TaylorScore`
   scores the accumulated gradients).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from compressor.config import PruneConfig
from compressor.errors import ConfigError
from compressor.models import predict_noise


@dataclass
class TaylorPass:
    """What the gradient-accumulation pass did."""

    timesteps: list[int]
    losses: list[float]
    seconds: float
    forward_calls: int = 0
    backward_calls: int = 0
    diagnostics: list[dict] = field(default_factory=list)

    @property
    def seconds_per_timestep(self) -> float:
        return self.seconds / max(1, len(self.timesteps))


def candidate_timesteps(num_train_timesteps: int, stride: int, max_count: int | None = None) -> list[int]:
    """Timesteps 0, stride, 2*stride, ... (ascending: low noise first), optionally capped."""
    steps = list(range(0, num_train_timesteps, stride))
    return steps[:max_count] if max_count else steps


def threshold_reached(loss: float, max_loss: float, threshold: float) -> bool:
    """Diff-Pruning's stopping rule: the loss fell below ``threshold`` times the max so far."""
    return threshold > 0 and loss < threshold * max_loss


def denoising_loss(
    unet: nn.Module,
    noise_scheduler,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: int,
    conditioning: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Epsilon-prediction MSE of ``unet`` at timestep ``t`` for clean samples ``x0`` (pixels, or
    latents of a latent model), called with ``conditioning`` (``encoder_hidden_states`` and/or
    ``class_labels``, item for item with ``x0``) when given."""
    timesteps = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
    noisy = noise_scheduler.add_noise(x0, noise, timesteps)
    return F.mse_loss(predict_noise(unet, noisy, timesteps, **(conditioning or {})), noise)


def _rows(conditioning: dict[str, torch.Tensor] | None, part: slice) -> dict[str, torch.Tensor] | None:
    """The conditioning of the items in ``part`` (None stays None)."""
    return None if conditioning is None else {k: v[part] for k, v in conditioning.items()}


def accumulate_taylor_grads(
    unet: nn.Module,
    noise_scheduler,
    x0: torch.Tensor,
    noise: torch.Tensor,
    candidates: list[int],
    threshold: float,
    on_step: Callable[[int, float], None] | None = None,
    diagnose: bool = False,
    kept_layers: tuple[nn.Module, ...] = (),
    conditioning: dict[str, torch.Tensor] | None = None,
) -> TaylorPass:
    """Accumulate ``dL_t/dw`` over ``candidates`` until the threshold rule stops it.

    Gradients are never zeroed between timesteps. Parameters that received no
    gradient get zeros, because torch-pruning's Taylor importance reads every
    ``.grad`` in a group.

    With ``diagnose`` every candidate is visited (the ones past the threshold only
    measured, never accumulated) as two half-batch passes, and
    ``TaylorPass.diagnostics`` gets one row per timestep: the loss, ``L_t / L_max``,
    the norm of that timestep's gradient and the cosine between the gradients of
    the two halves (near 1: the direction is signal; near 0: noise), both over the
    parameters that can be pruned: ``kept_layers`` (the output conv, never pruned) are left
    out, since their gradient follows each half's noise mean and would swamp the rest.

    ``conditioning``: a conditional UNet's keyword inputs for the items of ``x0``
    (``encoder_hidden_states`` (B, tokens, width) and/or ``class_labels`` (B,)); every call of
    the pass gets them. Without them the UNet is called as before (a ``UNet2DConditionModel``
    with the null context).
    """
    unet.zero_grad(set_to_none=True)
    used: list[int] = []
    losses: list[float] = []
    rows: list[dict] = []
    max_loss = 0.0
    start = time.perf_counter()
    forward_calls = backward_calls = 0
    stopped_grads: list[torch.Tensor | None] | None = None
    skip = {id(p) for layer in kept_layers for p in layer.parameters()}
    for t in candidates:
        if diagnose:
            value, grad_norm, cosine, calls = _diagnosed_step(
                unet, noise_scheduler, x0, noise, t, skip, conditioning
            )
            forward_calls += calls
            backward_calls += calls
            accumulated = stopped_grads is None
            rows.append(
                {
                    "t": t,
                    "loss": value,
                    "grad_norm": grad_norm,
                    "half_cosine": cosine,
                    "accumulated": accumulated,
                }
            )
            if stopped_grads is not None:
                if on_step:
                    on_step(t, value)
                continue
        else:
            loss = denoising_loss(unet, noise_scheduler, x0, noise, t, conditioning)
            forward_calls += 1
            loss.backward()
            backward_calls += 1
            value = float(loss.detach())
        used.append(t)
        losses.append(value)
        max_loss = max(max_loss, value)
        if on_step:
            on_step(t, value)
        if threshold_reached(value, max_loss, threshold):
            if not diagnose:
                break
            # keep measuring later timesteps, but importance is what was accumulated up to here
            stopped_grads = [None if p.grad is None else p.grad.clone() for p in unet.parameters()]
    if stopped_grads is not None:
        for p, g in zip(unet.parameters(), stopped_grads, strict=True):
            p.grad = g
    if rows:
        overall_max = max(r["loss"] for r in rows)
        for r in rows:
            r["loss_ratio"] = r["loss"] / overall_max if overall_max > 0 else None
    for p in unet.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return TaylorPass(used, losses, time.perf_counter() - start, forward_calls, backward_calls, rows)


def _flat_grads(params: list[nn.Parameter]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def _diagnosed_step(
    unet: nn.Module,
    noise_scheduler,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: int,
    skip: set[int],
    conditioning: dict[str, torch.Tensor] | None = None,
) -> tuple[float, float, float | None, int]:
    """One timestep as two half-batch backward passes that add up to the full-batch gradient.

    Each half's loss is weighted by its share of the batch, so the accumulated
    ``.grad`` and the returned loss equal those of one full-batch pass.
    Returns (loss, norm of this timestep's gradient, cosine of the halves' gradients, passes).
    """
    params = [p for p in unet.parameters() if p.requires_grad and id(p) not in skip]
    n = x0.shape[0]
    halves = [slice(0, n // 2), slice(n // 2, n)] if n > 1 else [slice(0, n)]
    start = before = _flat_grads(params)
    halves_grads, total = [], 0.0
    for part in halves:
        share = (part.stop - part.start) / n
        loss = denoising_loss(unet, noise_scheduler, x0[part], noise[part], t, _rows(conditioning, part))
        (loss * share).backward()
        total += float(loss.detach()) * share
        after = _flat_grads(params)
        halves_grads.append((after - before) / share)
        before = after
    grad = before - start  # this timestep's full-batch gradient
    cosine = float(F.cosine_similarity(*halves_grads, dim=0)) if len(halves_grads) == 2 else None
    return total, float(grad.norm()), cosine, len(halves)


class TaylorScore:
    """Taylor importance of a torch-pruning group from the accumulated ``.grad``.

    ``score``: per layer, ``abs`` sums ``|w * g|`` over a channel's parameters
    (torch-pruning's GroupTaylorImportance), ``squared`` sums ``(w * g)^2`` (the
    paper's experiment code). ``multivariable`` takes ``|sum w * g|`` (or its
    square) instead: the classic first-order Taylor criterion (the ``taylor``
    baseline). GroupNorm, LayerNorm and BatchNorm affine weights count with
    ``|w * g|``, as in the paper's code. ``group_reduction`` combines the coupled
    layers through torch-pruning's own reduction (mean or sum).
    """

    def __init__(self, score: str = "abs", multivariable: bool = False, group_reduction: str = "sum"):
        import torch_pruning as tp

        self.score = score
        self.multivariable = multivariable
        self._reducer = tp.importance.GroupTaylorImportance(group_reduction=group_reduction)
        fn = tp.pruner.function
        self._out_fns = (fn.prune_conv_out_channels, fn.prune_linear_out_channels)
        self._in_fns = (fn.prune_conv_in_channels, fn.prune_linear_in_channels)
        self._norm_fns = (
            fn.prune_groupnorm_out_channels,
            fn.prune_layernorm_out_channels,
            fn.prune_batchnorm_out_channels,
        )

    def _channel_score(self, wg: torch.Tensor) -> torch.Tensor:
        """(channels, params per channel) products w*g -> one score per channel."""
        if self.multivariable:
            s = wg.sum(1).abs()
            return s * s if self.score == "squared" else s
        return wg.pow(2).sum(1) if self.score == "squared" else wg.abs().sum(1)

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        scores, root_idxs = [], []
        for i, (dep, idxs) in enumerate(group):
            layer, fn = dep.target.module, dep.handler
            if fn in self._out_fns or fn in self._in_fns:
                w, g = layer.weight.data, _grad_of(layer.weight)
                transposed = getattr(layer, "transposed", False)
                if (fn in self._out_fns) == transposed:  # input channels lie on dim 1
                    w, g = w.transpose(0, 1), g.transpose(0, 1)
                local = self._channel_score((w * g).flatten(1))
                if fn in self._in_fns:
                    groups = getattr(layer, "groups", 1)
                    if groups not in (1, getattr(layer, "in_channels", 1)):
                        local = local.repeat(groups)
                local = local[idxs]
            elif fn in self._norm_fns:
                w = getattr(layer, "weight", None)
                if w is None:
                    continue
                local = (w.data * _grad_of(w))[idxs].abs()
            else:
                continue
            scores.append(local)
            root_idxs.append(group[i].root_idxs)
        if not scores:
            return None
        return self._reducer._reduce(scores, root_idxs)


def _grad_of(param: torch.Tensor) -> torch.Tensor:
    if param.grad is None:  # scoring without gradients would silently skip the layer
        raise RuntimeError("Taylor importance needs .grad on every parameter: run accumulate_taylor_grads")
    return param.grad


def make_importance(method: str, cfg: PruneConfig | None = None):
    """The torch-pruning importance criterion for a pruning method (scored as ``cfg`` says)."""
    import torch_pruning as tp

    cfg = cfg or PruneConfig()
    if method == "diff-pruning":
        return TaylorScore(cfg.taylor_score, multivariable=False, group_reduction=cfg.group_reduction)
    if method == "taylor":
        return TaylorScore(cfg.taylor_score, multivariable=True, group_reduction=cfg.group_reduction)
    if method == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=cfg.norm, group_reduction=cfg.group_reduction)
    if method in ("random", "reinit"):
        return tp.importance.RandomImportance()
    raise ConfigError(f"prune.method: unknown method {method!r}")
