"""Diff-Pruning and its baselines on diffusers UNets, through torch-pruning.

The method's pieces are separate functions:

1. :func:`candidate_timesteps` - which timesteps the Taylor pass may visit.
2. :func:`accumulate_taylor_grads` - one forward + backward per timestep, low noise
   first, accumulating gradients and stopping once ``L_t < T * L_max``
   (:func:`threshold_reached`; the crossing step is included, as in the paper's code).
3. :func:`make_importance` - the torch-pruning importance for a method.
4. :func:`prune_structure` - the structural driver: torch-pruning's dependency graph
   prunes coupled layers consistently; the output conv is never pruned.
5. :func:`sync_module_attributes` / :func:`preserve_attention_scale` - repair what
   torch-pruning leaves stale in diffusers modules and keep each attention's logit
   scale equal to the dense model's.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from compressor.config import PruneConfig
from compressor.errors import ConfigError
from compressor.models import count_macs_params, example_inputs, predict_noise


@dataclass
class TaylorPass:
    """What the gradient-accumulation pass did."""

    timesteps: list[int]
    losses: list[float]
    seconds: float
    forward_calls: int = 0
    backward_calls: int = 0

    @property
    def seconds_per_timestep(self) -> float:
        return self.seconds / max(1, len(self.timesteps))


@dataclass
class PruneResult:
    """A pruned UNet and everything needed to describe and replay it."""

    unet: nn.Module
    ratio: float
    history: list
    kept_widths: dict[str, list[int]]
    taylor: TaylorPass | None = None
    search: list[dict] = field(default_factory=list)


def candidate_timesteps(num_train_timesteps: int, stride: int, max_count: int | None = None) -> list[int]:
    """Timesteps 0, stride, 2*stride, ... (ascending: low noise first), optionally capped."""
    steps = list(range(0, num_train_timesteps, stride))
    return steps[:max_count] if max_count else steps


def threshold_reached(loss: float, max_loss: float, threshold: float) -> bool:
    """Diff-Pruning's stopping rule: the loss fell below ``threshold`` times the max so far."""
    return threshold > 0 and loss < threshold * max_loss


def denoising_loss(
    unet: nn.Module, noise_scheduler, x0: torch.Tensor, noise: torch.Tensor, t: int
) -> torch.Tensor:
    """Epsilon-prediction MSE of ``unet`` at timestep ``t`` for clean images ``x0``."""
    timesteps = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
    noisy = noise_scheduler.add_noise(x0, noise, timesteps)
    return F.mse_loss(predict_noise(unet, noisy, timesteps), noise)


def accumulate_taylor_grads(
    unet: nn.Module,
    noise_scheduler,
    x0: torch.Tensor,
    noise: torch.Tensor,
    candidates: list[int],
    threshold: float,
    on_step: Callable[[int, float], None] | None = None,
) -> TaylorPass:
    """Accumulate ``dL_t/dw`` over ``candidates`` until the threshold rule stops it.

    Gradients are never zeroed between timesteps. Parameters that received no
    gradient get zeros, because torch-pruning's Taylor importance reads every
    ``.grad`` in a group.
    """
    unet.zero_grad(set_to_none=True)
    used: list[int] = []
    losses: list[float] = []
    max_loss = 0.0
    start = time.perf_counter()
    forward_calls = backward_calls = 0
    for t in candidates:
        loss = denoising_loss(unet, noise_scheduler, x0, noise, t)
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
            break
    for p in unet.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return TaylorPass(used, losses, time.perf_counter() - start, forward_calls, backward_calls)


def make_importance(method: str, norm: int = 2):
    """The torch-pruning importance criterion for a pruning method."""
    import torch_pruning as tp

    if method == "diff-pruning":
        return tp.importance.GroupTaylorImportance(multivariable=False)
    if method == "taylor":
        return tp.importance.GroupTaylorImportance(multivariable=True)
    if method == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=norm)
    if method in ("random", "reinit"):
        return tp.importance.RandomImportance()
    raise ConfigError(f"prune.method: unknown method {method!r}")


def attention_modules(unet: nn.Module) -> dict[str, nn.Module]:
    """diffusers Attention modules by qualified name."""
    from diffusers.models.attention_processor import Attention

    return {n: m for n, m in unet.named_modules() if isinstance(m, Attention)}


def head_dims(unet: nn.Module) -> dict[str, int]:
    """Per-attention head dimension (query width / heads)."""
    return {n: a.to_q.out_features // a.heads for n, a in attention_modules(unet).items()}


def build_pruner(unet: nn.Module, importance, ratio: float, round_to: int | None):
    """A torch-pruning pruner over the whole UNet, output conv kept, heads kept consistent."""
    import torch_pruning as tp

    num_heads: dict[nn.Module, int] = {}
    for attn in attention_modules(unet).values():
        for lin in (attn.to_q, attn.to_k, attn.to_v):
            num_heads[lin] = attn.heads
    device = next(unet.parameters()).device
    return tp.pruner.BasePruner(
        unet,
        example_inputs(unet, 1, device),
        importance=importance,
        pruning_ratio=ratio,
        ignored_layers=[unet.conv_out],
        round_to=round_to,
        num_heads=num_heads,
        prune_num_heads=False,
        prune_head_dims=True,
    )


def sync_module_attributes(unet: nn.Module) -> None:
    """Update the width attributes that diffusers modules cache and torch-pruning leaves stale."""
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    for module in unet.modules():
        for resamplers in ("downsamplers", "upsamplers"):
            group = getattr(module, resamplers, None)
            resnets = getattr(module, "resnets", None)
            if group is None or not resnets:
                continue
            width = resnets[-1].conv2.out_channels
            for r in group:
                if isinstance(r, (Downsample2D, Upsample2D)):
                    conv = getattr(r, "conv", None)
                    if isinstance(conv, nn.Module) and hasattr(conv, "in_channels"):
                        r.channels, r.out_channels = conv.in_channels, conv.out_channels
                    else:
                        r.channels = r.out_channels = width
        if isinstance(module, ResnetBlock2D):
            module.in_channels = module.conv1.in_channels
            module.out_channels = module.conv2.out_channels
    for attn in attention_modules(unet).values():
        attn.inner_dim = attn.to_q.out_features
        attn.inner_kv_dim = attn.to_k.out_features
        attn.out_dim = attn.to_out[0].out_features
        attn.query_dim = attn.to_q.in_features
        if attn.scale_qk:
            attn.scale = (attn.to_q.out_features // attn.heads) ** -0.5


def preserve_attention_scale(unet: nn.Module, dense_head_dims: dict[str, int]) -> None:
    """Fold sqrt(new/old head dim) into ``to_q`` so logits keep the dense 1/sqrt(old) scale.

    diffusers' SDPA processor scales by 1/sqrt(actual head dim); after pruning that
    would silently change the attention temperature the weights were trained with.
    """
    with torch.no_grad():
        for name, attn in attention_modules(unet).items():
            new = attn.to_q.out_features // attn.heads
            old = dense_head_dims[name]
            if new != old and attn.scale_qk:
                factor = math.sqrt(new / old)
                attn.to_q.weight.mul_(factor)
                if attn.to_q.bias is not None:
                    attn.to_q.bias.mul_(factor)


def layer_widths(unet: nn.Module) -> dict[str, int]:
    """Output width of every conv and linear layer."""
    out = {}
    for name, m in unet.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            out[name] = m.out_channels
        elif isinstance(m, nn.Linear):
            out[name] = m.out_features
    return out


def prune_structure(unet: nn.Module, importance, ratio: float, round_to: int | None, seed: int = 0) -> list:
    """Prune ``unet`` in place at a uniform per-layer ``ratio``; returns the pruning history."""
    dense_heads = head_dims(unet)
    pruner = build_pruner(unet, importance, ratio, round_to)
    torch.manual_seed(seed)  # RandomImportance draws from the global generator
    pruner.step()
    sync_module_attributes(unet)
    preserve_attention_scale(unet, dense_heads)
    return _plain_history(pruner.DG.pruning_history())


def _plain_history(history: list) -> list:
    """JSON-friendly copy of a torch-pruning history: [module, is_out, [idx, ...]]."""
    return [[name, bool(is_out), [int(i) for i in idxs]] for name, is_out, idxs in history]


def replay_history(unet: nn.Module, history: list) -> None:
    """Re-apply a saved pruning history to a freshly built dense UNet (exact structure)."""
    import torch_pruning as tp

    device = next(unet.parameters()).device
    dg = tp.DependencyGraph().build_dependency(unet, example_inputs=example_inputs(unet, 1, device))
    dg.load_pruning_history([[n, o, list(i)] for n, o, i in history])
    sync_module_attributes(unet)


def reinitialize(unet: nn.Module, seed: int) -> None:
    """Reset every layer to its default initialisation ("train from scratch" at the pruned size)."""
    torch.manual_seed(seed)
    for m in unet.modules():
        if m is not unet and hasattr(m, "reset_parameters"):
            m.reset_parameters()


def kept_fraction(
    unet: nn.Module, ratio: float, round_to: int | None, dense: tuple[int, int]
) -> tuple[float, float]:
    """(MACs, params) fractions kept if ``unet`` were pruned at ``ratio`` (on a copy)."""
    import torch_pruning as tp

    trial = copy.deepcopy(unet)
    prune_structure(trial, tp.importance.GroupMagnitudeImportance(p=1), ratio, round_to)
    macs, params = count_macs_params(trial)
    return macs / dense[0], params / dense[1]


def uniform_ratios(unet: nn.Module) -> list[float]:
    """Ratios at which every GroupNorm group loses the same whole number of channels.

    At these ratios every prunable layer keeps the same fraction of its width (the
    paper's pruned models are of this kind); between them only the layers that no
    GroupNorm couples (attention q/k/v, time embedding) change.
    """
    sizes = [m.num_channels // m.num_groups for m in unet.modules() if isinstance(m, nn.GroupNorm)]
    steps = min(sizes) if sizes else 32
    return [k / steps for k in range(1, steps)]


def search_ratio(
    unet: nn.Module,
    target: float,
    metric: str,
    round_to: int | None,
    dense: tuple[int, int],
    mode: str = "uniform",
    iterations: int = 8,
    on_trial: Callable[[float, float, float], None] | None = None,
) -> tuple[float, list[dict]]:
    """The ratio giving the largest pruned model that keeps at most ``target`` of MACs/params.

    ``uniform`` walks :func:`uniform_ratios` from the mildest and stops at the first
    that meets the target; ``fine`` then bisects between that ratio and the previous
    one, which trims only the layers that no GroupNorm couples. Raises ConfigError
    when no ratio reaches the target.
    """
    index = 0 if metric == "macs" else 1
    trials: list[dict] = []

    def evaluate(r: float) -> float:
        fr = kept_fraction(unet, r, round_to, dense)
        trials.append({"ratio": round(r, 6), "macs_kept": fr[0], "params_kept": fr[1]})
        if on_trial:
            on_trial(r, fr[0], fr[1])
        return fr[index]

    if target >= 1.0:
        return 0.0, trials
    previous = 0.0
    for r in uniform_ratios(unet):
        if evaluate(r) <= target:
            if mode == "fine":
                lo, hi = previous, r
                for _ in range(iterations):
                    mid = (lo + hi) / 2
                    if evaluate(mid) <= target:
                        hi = mid
                    else:
                        lo = mid
                r = hi
            return r, trials
        previous = r
    smallest = min(t[f"{metric}_kept"] for t in trials)
    raise ConfigError(
        f"prune.target_{metric}={target}: not reachable; the smallest model this architecture "
        f"allows keeps {smallest:.3f} of its {metric}. Raise the target or use prune.ratio"
    )


def prune_unet(
    unet: nn.Module,
    noise_scheduler,
    images: torch.Tensor | None,
    cfg: PruneConfig,
    seed: int,
    on_taylor_step: Callable[[int, float], None] | None = None,
    on_search_trial: Callable[[float, float, float], None] | None = None,
) -> PruneResult:
    """Prune ``unet`` in place by ``cfg`` (method, target) and describe what was done."""
    cfg.require_target()
    dense_widths = layer_widths(unet)
    search: list[dict] = []
    if cfg.ratio is not None:
        ratio = cfg.ratio
    else:
        metric = "macs" if cfg.target_macs is not None else "params"
        target = cfg.target_macs if cfg.target_macs is not None else cfg.target_params
        dense = count_macs_params(unet)
        ratio, search = search_ratio(
            unet, target, metric, cfg.round_to, dense, cfg.search, on_trial=on_search_trial
        )
    taylor = None
    if cfg.method in ("diff-pruning", "taylor"):
        if images is None:
            raise ConfigError(f"prune.method={cfg.method} needs training images for the Taylor pass")
        g = torch.Generator().manual_seed(seed)
        x0 = images[: cfg.batch_size]
        noise = torch.randn(x0.shape, generator=g).to(x0.device)
        candidates = candidate_timesteps(
            noise_scheduler.config.num_train_timesteps, cfg.timestep_stride, cfg.max_timesteps
        )
        threshold = cfg.threshold if cfg.method == "diff-pruning" else 0.0
        unet.eval()  # no dropout noise in the importance estimate
        taylor = accumulate_taylor_grads(
            unet, noise_scheduler, x0, noise, candidates, threshold, on_taylor_step
        )
    history = prune_structure(unet, make_importance(cfg.method, cfg.norm), ratio, cfg.round_to, seed)
    unet.zero_grad(set_to_none=True)
    if cfg.method == "reinit":
        reinitialize(unet, seed)
    kept = layer_widths(unet)
    widths = {name: [dense_widths[name], kept[name]] for name in kept}
    return PruneResult(unet, ratio, history, widths, taylor, search)
