"""Channel choice inside GroupNorm groups, the paper's Taylor score, the diagnostic, kept channels."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp

from compressor.channels import (
    channel_overlap,
    channel_widths,
    compact_indices,
    expand_indices,
    kept_channels,
)
from compressor.config import PruneConfig
from compressor.data import TensorImages, taylor_and_holdout
from compressor.errors import DataError
from compressor.models import count_macs_params, example_inputs, predict_noise
from compressor.persist import dense_config, load_unet, save_unet
from compressor.pruning import prune_structure, prune_unet
from compressor.sampling import make_scheduler
from compressor.taylor import TaylorScore, accumulate_taylor_grads, candidate_timesteps, make_importance
from tests.conftest import DDPM_SCHEDULER

GROUP = 4  # tiny UNet: GroupNorm with 4 groups (4 channels each at 16, 8 at 32), 4 heads at 32


@pytest.fixture
def scheduler():
    return make_scheduler("ddpm", DDPM_SCHEDULER)


def _taylor_grads(unet, scheduler, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(6, 3, 16, 16, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    accumulate_taylor_grads(unet, scheduler, x0, noise, [0, 300, 600], 0.0)


def _copy(unet):
    """A deep copy that keeps the accumulated gradients (deepcopy drops ``.grad``)."""
    twin = copy.deepcopy(unet)
    for p, q in zip(unet.parameters(), twin.parameters(), strict=True):
        q.grad = None if p.grad is None else p.grad.clone()
    return twin


def _edit_channel(unet, channel: int, *, grad: float | None = None, weight: float | None = None) -> None:
    """Scale (or zero) one channel of ``conv_in``'s whole dependency group: weights and/or grads."""
    dg = tp.DependencyGraph().build_dependency(unet, example_inputs=example_inputs(unet, 1))
    group = dg.get_pruning_group(unet.conv_in, tp.prune_conv_out_channels, [channel])
    in_fns = (tp.prune_conv_in_channels, tp.prune_linear_in_channels)
    with torch.no_grad():
        for dep, idxs in group:
            layer = dep.target.module
            w = getattr(layer, "weight", None)
            if not isinstance(w, torch.Tensor):
                continue
            dim = 1 if dep.handler in in_fns else 0
            index = torch.tensor(idxs)
            if weight is not None:
                w.data.index_copy_(dim, index, w.data.index_select(dim, index) * weight)
            if grad is not None and w.grad is not None:
                w.grad.index_copy_(dim, index, w.grad.index_select(dim, index) * grad)


def _kept(unet, scheduler, method: str, selection: str, **extra) -> dict[str, str]:
    """Prune with the gradients the caller prepared (no Taylor pass); the kept channels."""
    cfg = PruneConfig(method=method, ratio=0.25, group_selection=selection, **extra)
    dense = channel_widths(unet)
    history = prune_structure(unet, make_importance(method, cfg), 0.25, None, 0, selection)
    return kept_channels(history, dense)


def _dropped_in_conv_in(kept: dict[str, str]) -> list[int]:
    return sorted(set(range(16)) - set(expand_indices(kept["conv_in"])))


def test_independent_selection_prunes_the_zero_score_channel_and_keeps_its_group_mates(tiny_unet, scheduler):
    _taylor_grads(tiny_unet, scheduler)
    _edit_channel(tiny_unet, 1, weight=0.0)  # w*g = 0 in every layer of channel 1 (group 0)
    _edit_channel(tiny_unet, 6, weight=0.0)  # and of channel 6 (group 1, position 2)
    kept = _kept(_copy(tiny_unet), scheduler, "diff-pruning", "independent")
    dropped = _dropped_in_conv_in(kept)
    assert 1 in dropped and 6 in dropped
    assert {0, 2, 3, 4, 5, 7} <= set(expand_indices(kept["conv_in"]))  # their group-mates stay
    positions = {i // GROUP: i % GROUP for i in dropped}
    assert positions[0] != positions[1]  # two GroupNorm groups dropped different in-group positions


def test_shared_selection_drops_the_same_positions_in_every_group(tiny_unet, scheduler):
    _taylor_grads(tiny_unet, scheduler)
    kept = _kept(tiny_unet, scheduler, "diff-pruning", "shared")
    dropped = _dropped_in_conv_in(kept)
    assert len({i % GROUP for i in dropped}) == 1 and len(dropped) == 16 // GROUP


@pytest.mark.parametrize("method", ["diff-pruning", "taylor", "magnitude", "random"])
def test_every_group_keeps_the_same_count_and_sizes_do_not_change(tiny_unet, scheduler, method):
    _taylor_grads(tiny_unet, scheduler)
    shared = _copy(tiny_unet)
    kept = _kept(tiny_unet, scheduler, method, "independent")
    _kept(shared, scheduler, method, "shared")
    assert count_macs_params(tiny_unet) == count_macs_params(shared)
    grouped = 0
    for name, text in kept.items():
        width = {"conv_in": 16}.get(name) or _dense_width(name)
        if width not in (16, 32):
            continue  # time-embedding layers: no channel groups
        idx = expand_indices(text)
        counts = [sum(1 for i in idx if g * width // GROUP <= i < (g + 1) * width // GROUP) for g in range(4)]
        assert len(set(counts)) == 1, (name, counts)
        grouped += 1
    assert grouped >= 5


def _dense_width(name: str) -> int | None:
    from compressor.models import build_unet
    from tests.conftest import TINY_UNET

    widths = channel_widths(build_unet(TINY_UNET, seed=0))
    base, _, side = name.partition(":")
    return widths[base][1 if side else 0] if base in widths else None


def test_diff_pruning_and_magnitude_choose_differently_when_their_scores_differ(tiny_unet, scheduler):
    _taylor_grads(tiny_unet, scheduler)
    _edit_channel(tiny_unet, 5, grad=0.0, weight=10.0)  # large weights, zero gradient
    ours = _kept(_copy(tiny_unet), scheduler, "diff-pruning", "independent")
    magnitude = _kept(_copy(tiny_unet), scheduler, "magnitude", "independent")
    assert 5 in _dropped_in_conv_in(ours) and 5 not in _dropped_in_conv_in(magnitude)
    assert channel_overlap(ours, magnitude)["mean"] < 1.0


def test_pruned_model_runs_reloads_and_exports(tiny_unet, scheduler, tmp_path):
    from deploy.runtimes import onnxruntime_backend
    from export.onnx_export import export_unet

    cfg = dense_config(tiny_unet)
    images = torch.randn(8, 3, 16, 16)
    prune_cfg = PruneConfig(method="diff-pruning", ratio=0.25, timestep_stride=250, batch_size=8)
    assert prune_cfg.group_selection == "independent"
    result = prune_unet(tiny_unet, scheduler, images, prune_cfg, seed=0)
    save_unet(tiny_unet, tmp_path / "m", cfg, result.history, result.kept_widths)
    again, _ = load_unet(tmp_path / "m")
    x = example_inputs(tiny_unet, 2)
    with torch.no_grad():
        a = predict_noise(tiny_unet, x["sample"], x["timestep"])
        b = predict_noise(again, x["sample"], x["timestep"])
    assert torch.isfinite(a).all() and torch.equal(a, b)
    export_unet(tiny_unet, tmp_path / "u.onnx", "fp32")
    onnx_out = onnxruntime_backend(tmp_path / "u.onnx").predict(x["sample"], x["timestep"])
    assert (torch.as_tensor(onnx_out) - a).abs().max() < 1e-4


def test_abs_score_matches_torch_prunings_group_taylor_importance(tiny_unet, scheduler):
    """Our |w*g| variant is torch-pruning's GroupTaylorImportance with norm weights counted."""
    _taylor_grads(tiny_unet, scheduler)
    dg = tp.DependencyGraph().build_dependency(tiny_unet, example_inputs=example_inputs(tiny_unet, 1))
    group = dg.get_pruning_group(tiny_unet.conv_in, tp.prune_conv_out_channels, list(range(16)))
    reference = tp.importance.GroupTaylorImportance(
        group_reduction="sum",
        normalizer=None,
        target_types=[torch.nn.modules.conv._ConvNd, torch.nn.Linear, torch.nn.GroupNorm],
    )(group)
    ours = TaylorScore("abs", group_reduction="sum")(group)
    assert torch.allclose(ours, reference, rtol=1e-5)
    squared = TaylorScore("squared", group_reduction="sum")(group)
    assert not torch.allclose(squared / squared.sum(), ours / ours.sum())


def test_group_reduction_does_not_change_the_ranking(tiny_unet, scheduler):
    _taylor_grads(tiny_unet, scheduler)
    a = _kept(_copy(tiny_unet), scheduler, "diff-pruning", "independent", group_reduction="sum")
    b = _kept(_copy(tiny_unet), scheduler, "diff-pruning", "independent", group_reduction="mean")
    assert a == b


def test_diagnostic_visits_every_candidate_and_accumulates_only_the_kept_prefix(scheduler):
    from compressor.models import build_unet
    from tests.conftest import TINY_UNET

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 3, 16, 16, generator=g), torch.randn(6, 3, 16, 16, generator=g)
    cands = candidate_timesteps(1000, 100)
    plain_unet, diag_unet = build_unet(TINY_UNET, 0), build_unet(TINY_UNET, 0)
    plain = accumulate_taylor_grads(plain_unet, scheduler, x0, noise, cands, 0.995)
    diag = accumulate_taylor_grads(diag_unet, scheduler, x0, noise, cands, 0.995, diagnose=True)
    assert diag.timesteps == plain.timesteps and len(plain.timesteps) < len(cands)
    assert [r["t"] for r in diag.diagnostics] == cands
    assert [r["accumulated"] for r in diag.diagnostics] == [t in plain.timesteps for t in cands]
    assert diag.losses == pytest.approx(plain.losses, rel=1e-5)
    assert max(r["loss_ratio"] for r in diag.diagnostics) == pytest.approx(1.0)
    assert all(-1.0 <= r["half_cosine"] <= 1.0 and r["grad_norm"] > 0 for r in diag.diagnostics)
    assert diag.forward_calls == 2 * len(cands)
    for p, q in zip(plain_unet.parameters(), diag_unet.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-4)  # the halves add up to the batch
    # the never-pruned output conv is left out of the measured gradient, not out of the accumulation
    twin = build_unet(TINY_UNET, 0)
    body = accumulate_taylor_grads(
        twin, scheduler, x0, noise, cands[:2], 0.0, diagnose=True, kept_layers=(twin.conv_out,)
    )
    assert body.diagnostics[0]["grad_norm"] < diag.diagnostics[0]["grad_norm"]


def test_taylor_batch_is_shuffled_by_seed_and_never_holds_the_held_out_images():
    images = torch.arange(40, dtype=torch.float32).view(40, 1, 1, 1)
    data = TensorImages(images, "ids")
    t0, h0 = taylor_and_holdout(data, 10, 8, seed=0)
    t1, h1 = taylor_and_holdout(data, 10, 8, seed=1)
    ids = lambda x: set(x.flatten().int().tolist())  # noqa: E731
    assert ids(h0) == ids(h1) and len(ids(h0)) == 8  # the same held-out images for every seed
    assert not ids(t0) & ids(h0) and not ids(t1) & ids(h1)
    assert ids(t0) != ids(t1) and ids(t0) != set(range(10))  # shuffled, not the first images
    short_t, short_h = taylor_and_holdout(data, 36, 8, seed=0)
    assert len(short_t) == 36 and len(short_h) == 4  # only what the data can spare is held out
    with pytest.raises(DataError, match="prune.batch_size=41"):
        taylor_and_holdout(data, 41, 8, seed=0)


def test_kept_channels_are_compact_and_comparable():
    assert compact_indices([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert expand_indices("0-2,5,7-8") == [0, 1, 2, 5, 7, 8]
    a = {"x": "0-3", "y": "0-1"}
    b = {"x": "0-1,4-5", "y": "0-1", "z": "0"}
    result = channel_overlap(a, b)
    assert result["layers"] == {"x": pytest.approx(2 / 6), "y": 1.0}
    assert result["pooled"] == pytest.approx(4 / 8)


@pytest.mark.parametrize("selection", ["shared", "independent"])
def test_round_to_rounds_groupnorm_coupled_layers_instead_of_leaving_them_dense(tiny_unet, selection):
    """torch-pruning 1.6 left GroupNorm-coupled layers unpruned with round_to; here they round."""
    dense = channel_widths(tiny_unet)
    plain = prune_unet(_copy(tiny_unet), None, None, PruneConfig(method="magnitude", ratio=0.25), 0)
    cfg = PruneConfig(method="magnitude", ratio=0.25, round_to=8, group_selection=selection)
    rounded = prune_unet(tiny_unet, None, None, cfg, 0)
    for name, (width, kept) in rounded.kept_widths.items():
        if kept != plain.kept_widths[name][1]:
            assert kept % 8 == 0 and kept < width, (name, width, kept)
    # conv_in (16 channels, GroupNorm groups of 4) keeps 8, not torch-pruning's unpruned 16
    assert rounded.kept_widths["conv_in"] == [16, 8] and plain.kept_widths["conv_in"] == [16, 12]
    assert dense["conv_in"][0] == 16
