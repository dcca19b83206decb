"""Which channels a pruning kept: widths per layer, compact index ranges, overlap between runs."""

from __future__ import annotations

from torch import nn


def channel_widths(unet: nn.Module) -> dict[str, tuple[int, int]]:
    """(output, input) channel count of every conv and linear layer by name."""
    out = {}
    for name, m in unet.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            out[name] = (m.out_channels, m.in_channels)
        elif isinstance(m, nn.Linear):
            out[name] = (m.out_features, m.in_features)
    return out


def compact_indices(indices: list[int]) -> str:
    """Sorted indices as ranges: [0, 1, 2, 5, 7, 8] -> "0-2,5,7-8"."""
    parts: list[str] = []
    values = sorted(set(indices))
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ",".join(parts)


def expand_indices(text: str) -> list[int]:
    """Inverse of :func:`compact_indices`."""
    out: list[int] = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def kept_channels(history: list, dense: dict[str, tuple[int, int]]) -> dict[str, str]:
    """Per pruned layer group (its root layer in the history), the dense channel indices kept.

    Keys are the root layer's name, with ``:in`` when the group was rooted at an
    input dimension (attention); values are :func:`compact_indices` strings.
    """
    out = {}
    for name, is_out, idxs in history:
        if name not in dense:
            continue
        width = dense[name][0 if is_out else 1]
        pruned = set(int(i) for i in idxs)
        out[name if is_out else f"{name}:in"] = compact_indices([i for i in range(width) if i not in pruned])
    return out


def channel_overlap(a: dict[str, str], b: dict[str, str]) -> dict:
    """Jaccard overlap of two runs' kept channels (e.g. two prune records' ``kept_channels``).

    Returns the mean over the layer groups both pruned, the pooled figure (all
    intersections over all unions) and the per-layer values.
    """
    per_layer = {}
    inter = union = 0
    for name in sorted(set(a) & set(b)):
        sa, sb = set(expand_indices(a[name])), set(expand_indices(b[name]))
        i, u = len(sa & sb), len(sa | sb)
        per_layer[name] = i / u if u else 1.0
        inter, union = inter + i, union + u
    mean = sum(per_layer.values()) / len(per_layer) if per_layer else None
    return {"mean": mean, "pooled": inter / union if union else None, "layers": per_layer}


def plain_history(history: list) -> list:
    """JSON-friendly copy of a torch-pruning history: [module, is_out, [idx, ...]]."""
    return [[name, bool(is_out), [int(i) for i in idxs]] for name, is_out, idxs in history]
