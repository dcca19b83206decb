"""Diff-Pruning and its baselines on diffusers UNets, through torch-pruning.

The method's pieces are separate functions:

1-3. The Taylor pass and the importance it feeds live in :mod:`compressor.taylor`
   (``candidate_timesteps``, ``accumulate_taylor_grads`` with ``threshold_reached``,
   ``make_importance``); which channels were kept, in :mod:`compressor.channels`.
4. :func:`prune_structure` - the structural driver: torch-pruning's dependency graph
   prunes coupled layers consistently; the output conv is never pruned.
5. :func:`sync_module_attributes` / :func:`preserve_attention_scale` - repair what
   torch-pruning leaves stale in diffusers modules and keep each attention's logit
   scale equal to the dense model's.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from compressor.channels import channel_widths, kept_channels, plain_history
from compressor.config import PruneConfig
from compressor.errors import ConfigError
from compressor.models import count_macs_params, example_inputs
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


def attention_modules(unet: nn.Module) -> dict[str, nn.Module]:
    """diffusers Attention modules by qualified name."""
    from diffusers.models.attention_processor import Attention

    return {n: m for n, m in unet.named_modules() if isinstance(m, Attention)}


def head_dims(unet: nn.Module) -> dict[str, int]:
    """Per-attention head dimension (query width / heads)."""
    return {n: a.to_q.out_features // a.heads for n, a in attention_modules(unet).items()}


def level_blocks(unet: nn.Module) -> dict[int, list[nn.Module]]:
    """Resolution level -> the down/mid/up blocks working at it (level 0: full resolution)."""
    levels: dict[int, list[nn.Module]] = {}
    n = len(unet.down_blocks)
    for i, block in enumerate(unet.down_blocks):
        levels.setdefault(i, []).append(block)
    if getattr(unet, "mid_block", None) is not None:
        levels.setdefault(n - 1, []).append(unet.mid_block)
    for j, block in enumerate(unet.up_blocks):
        levels.setdefault(n - 1 - j, []).append(block)
    return levels


def stem_ratio(level_ratios: dict[int, float]) -> float:
    """The ratio of the layers outside the level blocks (stem, time embedding): level 0's."""
    return level_ratios.get(0, 0.0)


def level_ratio_dict(unet: nn.Module, level_ratios: dict[int, float]) -> dict[nn.Module, float]:
    """torch-pruning's ``pruning_ratio_dict`` giving every block of a level that level's ratio.

    Levels missing from ``level_ratios`` get 0 (kept whole): the pruner's default ratio
    would otherwise apply to them.
    """
    blocks = level_blocks(unet)
    return {block: level_ratios.get(lvl, 0.0) for lvl, bs in blocks.items() for block in bs}


def build_pruner(
    unet: nn.Module,
    importance,
    ratio: float,
    round_to: int | None = None,
    ratio_dict: dict[nn.Module, float] | None = None,
):
    """A torch-pruning pruner over the whole UNet, output conv kept, heads kept consistent.

    ``ratio_dict`` (block -> ratio) overrides ``ratio`` for the groups rooted in a block.
    """
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
        pruning_ratio_dict=ratio_dict,
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
    return {name: out for name, (out, _) in channel_widths(unet).items()}


def prune_structure(
    unet: nn.Module,
    importance,
    ratio: float,
    round_to: int | None,
    seed: int = 0,
    group_selection: str = "shared",
    level_ratios: dict[int, float] | None = None,
    stats: dict | None = None,
) -> list:
    """Prune ``unet`` in place at a uniform per-layer ``ratio``; returns the pruning history.

    ``level_ratios`` (resolution level -> ratio, see :func:`level_blocks`) prunes each
    level's blocks at its own ratio; layers outside the blocks keep ``ratio``. A
    ``stats`` dict receives ``importance_kept``: the fraction of the criterion's total
    importance (over every prunable group, scored before pruning) the kept channels hold.

    ``group_selection`` decides how layers split into channel groups (GroupNorm
    groups, attention heads) choose what to drop: ``shared`` is torch-pruning's
    rule (importance averaged over the groups, the same in-group positions removed
    from each); ``independent`` ranks the channels inside each group on their own
    and removes the same count from every group (the paper's experiment code).
    Counts, and so every size, are torch-pruning's in both cases, except that
    ``round_to`` rounds each layer's kept channels down to a multiple of
    ``lcm(round_to, channel groups)`` here: torch-pruning 1.6 rounds per-group
    counts against whole-layer widths and leaves GroupNorm-coupled layers unpruned.
    """
    dense_heads = head_dims(unet)
    ratio_dict = level_ratio_dict(unet, level_ratios) if level_ratios else None
    pruner = build_pruner(unet, importance, ratio, None, ratio_dict)
    torch.manual_seed(seed)  # RandomImportance draws from the global generator
    if group_selection == "shared" and not round_to and stats is None:
        pruner.step()
    else:
        scores = _root_importance(pruner)
        removed = 0.0
        for group in pruner.step(interactive=True):
            if group_selection != "shared" or round_to:
                group = _reselect(pruner, group, scores, group_selection, round_to)
            dep = group[0].dep
            imp = scores.get((dep.target.module, dep.handler))
            if imp is not None and group[0].idxs:
                removed += float(imp[list(group[0].idxs)].double().sum())
            group.prune()
        if stats is not None:
            total = sum(float(v.double().sum()) for v in scores.values())
            stats["importance_kept"] = 1 - removed / total if total else None
    sync_module_attributes(unet)
    preserve_attention_scale(unet, dense_heads)
    return plain_history(pruner.DG.pruning_history())


def level_of_modules(unet: nn.Module) -> dict[nn.Module, int]:
    """Module -> resolution level; layers outside the blocks (stem, time embedding) count as level 0."""
    owner = {m: 0 for m in unet.modules()}
    for lvl, blocks in level_blocks(unet).items():
        for block in blocks:
            owner.update({m: lvl for m in block.modules()})
    return owner


def importance_by_level(unet: nn.Module, importance, ratios: list[float]) -> dict[int, dict]:
    """Per level: its total importance and what each ratio would remove (least important first).

    Scores come from ``importance`` over torch-pruning's groups (Taylor after a Taylor
    pass); each channel group (GroupNorm group, head) loses its own least important
    channels, as under ``group_selection: independent``.
    """
    pruner = build_pruner(unet, importance, max(ratios))
    owner = level_of_modules(unet)
    out: dict[int, dict] = {}
    for group, imp in _scored_groups(pruner, check_ratio=False):
        imp = imp.double().cpu()
        lvl = owner.get(group[0].dep.target.module, 0)
        entry = out.setdefault(lvl, {"total": 0.0, "removed": dict.fromkeys(ratios, 0.0)})
        ch_groups = pruner._get_channel_groups(group)
        if len(imp) % ch_groups:
            ch_groups = 1
        size = len(imp) // ch_groups
        ranked = imp.view(ch_groups, size).sort(dim=1).values
        entry["total"] += float(imp.sum())
        for r in ratios:
            entry["removed"][r] += float(ranked[:, : int(size * r)].sum())
    return out


def _scored_groups(pruner, check_ratio: bool = True):
    """(group, importance) of every prunable group of the unpruned model.

    Mirrors the grouping of torch-pruning 1.6's ``BasePruner._prune`` (attention
    groups are rooted at their downstream layer there, so here too); ``check_ratio``
    skips the groups torch-pruning would not prune at the pruner's ratio.
    """
    for group in pruner.DG.get_all_groups(
        ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
    ):
        if check_ratio and not pruner._check_pruning_ratio(group):
            continue
        if pruner._is_atten_group(group)[0]:
            group = pruner._downstream_node_as_root_if_attention(group)
            if group is None:
                continue
        imp = pruner.estimate_importance(group)
        if imp is not None:
            yield group, imp.detach()


def _root_importance(pruner) -> dict[tuple, torch.Tensor]:
    """Importance of every prunable group before anything is pruned, keyed by its root.

    Scores must come from the unpruned model, as torch-pruning's own do.
    """
    return {(g[0].dep.target.module, g[0].dep.handler): imp.cpu() for g, imp in _scored_groups(pruner)}


def _reselect(pruner, group, scores: dict[tuple, torch.Tensor], selection: str, round_to: int | None):
    """The same pruning group with its victims chosen by ``selection`` (and count rounded)."""
    dep, idxs = group[0].dep, group[0].idxs
    imp = scores.get((dep.target.module, dep.handler))
    if imp is None or not idxs:
        return group
    ch_groups = pruner._get_channel_groups(group)
    count = len(idxs)
    if round_to:
        step = math.lcm(round_to, ch_groups)
        kept = len(imp) - count
        kept -= kept % step
        if kept <= 0:  # rounding would empty the layer: keep torch-pruning's count
            kept = len(imp) - count
        count = len(imp) - kept
    if count % ch_groups or len(imp) % ch_groups:
        raise RuntimeError(f"uneven channel groups in {dep.target.module!r}: {count} / {ch_groups}")
    per_group, size = count // ch_groups, len(imp) // ch_groups
    blocks = imp.view(ch_groups, size)
    if selection == "shared":
        shared = torch.argsort(blocks.mean(0), stable=True)[:per_group]
        chosen = [shared + g * size for g in range(ch_groups)]
    else:
        chosen = [torch.argsort(blocks[g], stable=True)[:per_group] + g * size for g in range(ch_groups)]
    return pruner.DG.get_pruning_group(dep.target.module, dep.handler, torch.cat(chosen).tolist())


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

    trial = copy.deepcopy(unet)  # sizes do not depend on which channels go, so one criterion serves all
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
    allocate: Callable[[nn.Module, object], dict[int, float]] | None = None,
) -> PruneResult:
    """Prune ``unet`` in place by ``cfg`` (method, target) and describe what was done.

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
            unet,
            noise_scheduler,
            x0,
            noise,
            candidates,
            threshold,
            on_taylor_step,
            cfg.diagnose,
            kept_layers=(unet.conv_out,) if hasattr(unet, "conv_out") else (),
        )
    dense_channels = channel_widths(unet)
    importance = make_importance(cfg.method, cfg)
    level_ratios = None
    if allocate is not None:
        level_ratios = allocate(unet, importance)
        ratio = stem_ratio(level_ratios)
    stats: dict = {}
    history = prune_structure(
        unet, importance, ratio, cfg.round_to, seed, cfg.group_selection, level_ratios, stats
    )
    kept_importance = None if cfg.method in ("random", "reinit") else stats.get("importance_kept")
    unet.zero_grad(set_to_none=True)
    if cfg.method == "reinit":
        reinitialize(unet, seed)
    kept = layer_widths(unet)
    widths = {name: [dense_widths[name], kept[name]] for name in kept}
    channels = kept_channels(history, dense_channels)
    return PruneResult(unet, ratio, history, widths, taylor, search, channels, level_ratios, kept_importance)
