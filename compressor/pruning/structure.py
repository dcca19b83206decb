"""The structural side of Diff-Pruning and its baselines on diffusers UNets, through torch-pruning.

- :func:`prune_structure` - the structural driver: torch-pruning's dependency graph prunes
  coupled layers consistently; the output conv is never pruned.
- :func:`sync_module_attributes` / :func:`preserve_attention_scale` - repair what torch-pruning
  leaves stale in diffusers modules and keep each attention's logit scale equal to the dense model's.
- :func:`level_blocks` and the per-level ratios and importance the latency search allocates by.
- :func:`replay_history` / :func:`reinitialize` - a saved structure rebuilt, the reinit baseline.

The searches that pick a ratio are :mod:`compressor.pruning.search`; :func:`compressor.pruning.prune_unet`
puts the pieces together.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from compressor.channels import channel_widths, plain_history
from compressor.models import example_inputs


def attention_modules(unet: nn.Module) -> dict[str, nn.Module]:
    """diffusers Attention modules by qualified name."""
    from diffusers.models.attention_processor import Attention

    return {n: m for n, m in unet.named_modules() if isinstance(m, Attention)}


def head_dims(unet: nn.Module) -> dict[str, int]:
    """Per-attention head dimension (query width / heads)."""
    return {n: a.to_q.out_features // a.heads for n, a in attention_modules(unet).items()}


def conditioning_widths(unet: nn.Module) -> dict[str, int]:
    """The widths pruning must never change, by name: the sample's channels in (``conv_in``) and out
    (``conv_out``), the timestep embedding's input (``time_embedding.linear_1``), the class count of a
    class embedding, and every cross-attention's key/value input (``to_k`` / ``to_v`` in_features:
    ``cross_attention_dim``, the text encoder's width)."""
    out: dict[str, int] = {}
    for name in ("conv_in", "conv_out"):
        conv = getattr(unet, name, None)
        if conv is not None:
            out[f"{name}.{'in' if name == 'conv_in' else 'out'}_channels"] = (
                conv.in_channels if name == "conv_in" else conv.out_channels
            )
    linear_1 = getattr(getattr(unet, "time_embedding", None), "linear_1", None)
    if isinstance(linear_1, nn.Linear):
        out["time_embedding.linear_1.in_features"] = linear_1.in_features
    emb = getattr(unet, "class_embedding", None)
    if isinstance(emb, nn.Embedding):
        out["class_embedding.num_embeddings"] = emb.num_embeddings
    for name, attn in attention_modules(unet).items():
        if attn.is_cross_attention:
            out[f"{name}.to_k.in_features"] = attn.to_k.in_features
            out[f"{name}.to_v.in_features"] = attn.to_v.in_features
    return out


def check_conditional_structure(unet: nn.Module, dense: dict[str, int]) -> None:
    """Raise RuntimeError where pruning broke a rule of conditional UNets: a width of
    :func:`conditioning_widths` changed, or an attention (self or cross) whose query, key and value
    widths differ or do not split into its unchanged head count (heads are kept; each loses the same
    channels, torch-pruning's ``prune_head_dims``)."""
    now = conditioning_widths(unet)
    changed = [f"{k}: {v} -> {now.get(k)}" for k, v in dense.items() if now.get(k) != v]
    for name, attn in attention_modules(unet).items():
        widths = {attn.to_q.out_features, attn.to_k.out_features, attn.to_v.out_features}
        if len(widths) != 1 or attn.to_q.out_features % attn.heads:
            changed.append(
                f"{name}: q/k/v widths {attn.to_q.out_features}/{attn.to_k.out_features}/"
                f"{attn.to_v.out_features} over {attn.heads} heads"
            )
    if changed:
        raise RuntimeError("pruning broke the UNet's fixed widths: " + "; ".join(changed))


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
    whole_heads: bool = False,
):
    """A torch-pruning pruner over the whole UNet, output conv kept, heads kept consistent.

    ``ratio_dict`` (block -> ratio) overrides ``ratio`` for the groups rooted in a block.

    Every attention, self (``attn1``) and cross (``attn2``) alike, keeps its head count and loses
    the same channels from each head (``num_heads`` on its q/k/v, ``prune_head_dims``), or with
    ``whole_heads`` loses whole heads at the same ratio and keeps its head dimension (torch-pruning's
    ``prune_num_heads``; the heads ranked by their mean importance). The inputs
    the graph is traced with (:func:`compressor.models.example_inputs`: the sample, the timestep, a
    conditional UNet's context and class label) are never pruned, and nothing feeds them, so the
    sample's channels in, the timestep and class embeddings' inputs and the cross-attention's
    key/value input width (``cross_attention_dim``) stay; ``conv_out`` is ignored so the sample's
    channels out stay too (:func:`check_conditional_structure` checks all of them after pruning).
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
        prune_num_heads=whole_heads,
        prune_head_dims=not whole_heads,
        head_pruning_ratio=ratio if whole_heads else 0.0,
        head_pruning_ratio_dict=ratio_dict if whole_heads else None,
    )


def uses_whole_heads(unet: nn.Module, setting: str) -> bool:
    """Whether ``prune.attention_heads`` (``whole``, ``dims`` or ``auto``) prunes ``unet``'s attention
    heads whole: ``auto`` does for a UNet with cross-attention (text-conditioned: Stable Diffusion's
    eight heads a layer), not for the unconditional DDPMs (often one head a layer)."""
    if setting != "auto":
        return setting == "whole"
    return any(a.is_cross_attention for a in attention_modules(unet).values())


def set_attention_heads(unet: nn.Module, heads: dict[str, int] | None) -> None:
    """Give each named attention its head count (a saved model pruned by whole heads); marks them so
    that a later save keeps the counts (:func:`pruned_heads`)."""
    if not heads:
        return
    for name, attn in attention_modules(unet).items():
        if name in heads:
            attn.heads = int(heads[name])
            attn.heads_pruned = True


def pruned_heads(unet: nn.Module) -> dict[str, int] | None:
    """Every attention's head count when whole heads were pruned (what a saved model must restore),
    else None (head counts are the config's)."""
    found = attention_modules(unet)
    if not any(getattr(a, "heads_pruned", False) for a in found.values()):
        return None
    return {name: int(a.heads) for name, a in found.items()}


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
    whole_heads: bool = False,
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

    ``whole_heads``: attentions lose whole heads (:func:`build_pruner`), chosen by torch-pruning
    under either selection; their new head counts are set on the modules.
    """
    dense_heads = head_dims(unet)
    ratio_dict = level_ratio_dict(unet, level_ratios) if level_ratios else None
    pruner = build_pruner(unet, importance, ratio, None, ratio_dict, whole_heads)
    torch.manual_seed(seed)  # RandomImportance draws from the global generator
    if group_selection == "shared" and not round_to and stats is None:
        pruner.step()
    else:
        scores = _root_importance(pruner)
        removed = 0.0
        for group in pruner.step(interactive=True):
            if (group_selection != "shared" or round_to) and not (
                whole_heads and _is_attention(pruner, group)
            ):
                group = _reselect(pruner, group, scores, group_selection, round_to)
            dep = group[0].dep
            imp = scores.get((dep.target.module, dep.handler))
            if imp is not None and group[0].idxs:
                removed += float(imp[list(group[0].idxs)].double().sum())
            group.prune()
        if stats is not None:
            total = sum(float(v.double().sum()) for v in scores.values())
            stats["importance_kept"] = 1 - removed / total if total else None
    if whole_heads:  # the head dimension is kept: the count follows the width
        set_attention_heads(
            unet, {n: a.to_q.out_features // dense_heads[n] for n, a in attention_modules(unet).items()}
        )
    sync_module_attributes(unet)
    preserve_attention_scale(unet, dense_heads)
    return plain_history(pruner.DG.pruning_history())


def _is_attention(pruner, group) -> bool:
    """Whether ``group`` prunes an attention's query/key/value widths (torch-pruning's own test)."""
    return bool(pruner._is_atten_group(group)[0])


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
