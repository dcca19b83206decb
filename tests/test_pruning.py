"""Diff-Pruning's pieces and the structural driver on tiny UNets."""

from __future__ import annotations

import copy

import pytest
import torch

from compressor.config import PruneConfig
from compressor.errors import ConfigError
from compressor.models import count_macs_params, example_inputs, predict_noise
from compressor.pruning import attention_modules, head_dims, prune_unet, search_ratio, uniform_ratios
from compressor.sampling import make_scheduler
from compressor.taylor import accumulate_taylor_grads, candidate_timesteps, threshold_reached
from tests.conftest import DDPM_SCHEDULER


@pytest.fixture
def scheduler():
    return make_scheduler("ddpm", DDPM_SCHEDULER)


class FixedLossUNet(torch.nn.Module):
    """Counts calls and returns a prediction whose loss is a chosen function of t."""

    def __init__(self, loss_of_t):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.loss_of_t = loss_of_t
        self.forward_calls = 0
        self.backward_calls = 0
        self.w.register_hook(self._count_backward)

    def _count_backward(self, grad):
        self.backward_calls += 1
        return grad

    def forward(self, sample, timestep, return_dict=False):
        self.forward_calls += 1
        t = int(timestep[0])
        # noise = 0 below, so the MSE is loss_of_t(t) * w^2
        return (torch.full_like(sample, self.loss_of_t(t) ** 0.5) * self.w,)


def decreasing_loss(t):
    return 1.0 / (1 + t)


def test_candidate_timesteps_ascend_with_stride_and_cap():
    assert candidate_timesteps(1000, 250) == [0, 250, 500, 750]
    assert candidate_timesteps(1000, 1, max_count=3) == [0, 1, 2]


def test_threshold_rule():
    assert not threshold_reached(0.01, 1.0, 0.0)  # T = 0 never stops
    assert threshold_reached(0.04, 1.0, 0.05)
    assert not threshold_reached(0.06, 1.0, 0.05)


def test_t_zero_accumulates_every_candidate(scheduler):
    unet = FixedLossUNet(decreasing_loss)
    x0, noise = torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)
    cands = candidate_timesteps(1000, 10)
    result = accumulate_taylor_grads(unet, scheduler, x0, noise, cands, threshold=0.0)
    assert result.timesteps == cands


def test_larger_threshold_keeps_a_shorter_low_noise_prefix(scheduler):
    x0, noise = torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)
    cands = candidate_timesteps(1000, 1)
    kept = {}
    for T in (0.0095, 0.045, 0.18):
        result = accumulate_taylor_grads(FixedLossUNet(decreasing_loss), scheduler, x0, noise, cands, T)
        kept[T] = result.timesteps
        assert result.timesteps == cands[: len(result.timesteps)]  # a prefix, starting at t=0
        # includes the crossing step: the last loss is the first below T * max
        assert result.losses[-1] < T * max(result.losses)
        assert all(v >= T * max(result.losses[: i + 1]) for i, v in enumerate(result.losses[:-1]))
    assert len(kept[0.18]) < len(kept[0.045]) < len(kept[0.0095])
    # 1/(1+t) < T  <=>  t > 1/T - 1
    assert kept[0.0095][-1] == 105 and kept[0.045][-1] == 22 and kept[0.18][-1] == 5


def test_one_forward_and_one_backward_per_timestep(scheduler):
    unet = FixedLossUNet(decreasing_loss)
    x0, noise = torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)
    result = accumulate_taylor_grads(unet, scheduler, x0, noise, candidate_timesteps(1000, 1), 0.05)
    n = len(result.timesteps)
    assert unet.forward_calls == n == result.forward_calls
    assert unet.backward_calls == n == result.backward_calls


def test_gradients_accumulate_across_timesteps(scheduler):
    unet = FixedLossUNet(lambda t: 1.0)
    x0, noise = torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)
    accumulate_taylor_grads(unet, scheduler, x0, noise, [0, 1, 2], 0.0)
    # d/dw of w^2 at w=1 is 2, three times
    assert unet.w.grad.item() == pytest.approx(6.0)


@pytest.mark.parametrize("method", ["diff-pruning", "taylor", "magnitude", "random", "reinit"])
def test_every_method_prunes_and_runs(tiny_unet, scheduler, method):
    dense_out = tiny_unet.conv_out.out_channels
    macs0, params0 = count_macs_params(tiny_unet)
    images = torch.randn(4, 3, 16, 16)
    cfg = PruneConfig(method=method, ratio=0.25, timestep_stride=200, batch_size=4)
    result = prune_unet(tiny_unet, scheduler, images, cfg, seed=0)
    macs1, params1 = count_macs_params(tiny_unet)
    assert macs1 < macs0 and params1 < params0
    assert tiny_unet.conv_out.out_channels == dense_out  # output conv intact
    assert result.kept_widths["conv_in"] == [16, 12]
    x = example_inputs(tiny_unet, 2)
    with torch.no_grad():
        out = predict_noise(tiny_unet, x["sample"], x["timestep"])
    assert out.shape == x["sample"].shape and torch.isfinite(out).all()
    if method in ("diff-pruning", "taylor"):
        assert result.taylor.timesteps[0] == 0
    else:
        assert result.taylor is None


@pytest.mark.parametrize("setting", ["dims", "whole"])
def test_heads_stay_consistent_and_processors_agree(tiny_cond_unet, scheduler, setting):
    from diffusers.models.attention_processor import AttnProcessor

    heads = {n: a.heads for n, a in attention_modules(tiny_cond_unet).items()}
    dims = head_dims(tiny_cond_unet)
    cfg = PruneConfig(method="magnitude", ratio=0.3, attention_heads=setting)
    prune_unet(tiny_cond_unet, scheduler, None, cfg, 0)
    for name, attn in attention_modules(tiny_cond_unet).items():
        if setting == "dims":  # the head count kept, each head narrower
            assert attn.heads == heads[name]
        else:  # whole heads gone (torch-pruning removes ceil(0.3 x 4) = 2), each of the dense width
            assert attn.heads == heads[name] - 2 and attn.to_q.out_features // attn.heads == dims[name]
        assert attn.to_q.out_features % attn.heads == 0
        assert attn.to_q.out_features == attn.to_k.out_features == attn.inner_dim
        assert attn.scale == pytest.approx((attn.to_q.out_features // attn.heads) ** -0.5)
    classic = copy.deepcopy(tiny_cond_unet)
    for attn in attention_modules(classic).values():
        attn.set_processor(AttnProcessor())
    x = example_inputs(tiny_cond_unet, 2)
    with torch.no_grad():
        a = predict_noise(tiny_cond_unet, x["sample"], x["timestep"])
        b = predict_noise(classic, x["sample"], x["timestep"])
    assert (a - b).abs().max() < 1e-5


def test_attention_logits_keep_the_dense_scale(tiny_unet, scheduler):
    """q.k * scale after pruning equals q.k / sqrt(dense head dim) with the unfolded weights."""
    dense = copy.deepcopy(tiny_unet)
    name = "mid_block.attentions.0"
    old_dim = attention_modules(dense)[name].to_q.out_features // attention_modules(dense)[name].heads
    result = prune_unet(tiny_unet, scheduler, None, PruneConfig(method="magnitude", ratio=0.25), 0)
    attn = attention_modules(tiny_unet)[name]
    new_dim = attn.to_q.out_features // attn.heads
    assert new_dim < old_dim
    # Replaying the same history on a copy of the dense model without the fold gives the raw weights.
    from compressor.pruning import replay_history

    raw = copy.deepcopy(dense)
    replay_history(raw, result.history)
    raw_q = attention_modules(raw)[name].to_q.weight
    x = torch.randn(5, attn.to_q.in_features)
    logits_pruned = (x @ attn.to_q.weight.T) @ (x @ attn.to_k.weight.T).T * attn.scale
    logits_dense_scale = (x @ raw_q.T) @ (x @ attn.to_k.weight.T).T / old_dim**0.5
    assert torch.allclose(logits_pruned, logits_dense_scale, atol=1e-5)


def test_uniform_ratios_follow_groupnorm_group_size(tiny_unet):
    # 16 channels / 4 groups = 4 channels per group -> 1/4, 2/4, 3/4
    assert uniform_ratios(tiny_unet) == [0.25, 0.5, 0.75]


def test_target_search_meets_the_target_and_refuses_the_impossible(tiny_unet):
    dense = count_macs_params(tiny_unet)
    ratio, trials = search_ratio(tiny_unet, 0.7, "macs", None, dense)
    assert ratio == 0.25
    assert trials[-1]["macs_kept"] <= 0.7
    ratio_fine, _ = search_ratio(tiny_unet, 0.7, "macs", None, dense, mode="fine")
    assert 0 < ratio_fine <= 0.25
    with pytest.raises(ConfigError, match="not reachable"):
        search_ratio(tiny_unet, 0.001, "macs", None, dense)


def test_prune_by_target_params_records_achievement(tiny_unet, scheduler):
    _, params0 = count_macs_params(tiny_unet)
    cfg = PruneConfig(method="magnitude", target_params=0.6)
    result = prune_unet(tiny_unet, scheduler, None, cfg, 0)
    _, params1 = count_macs_params(tiny_unet)
    assert params1 / params0 <= 0.6
    assert result.search and result.search[-1]["params_kept"] == pytest.approx(params1 / params0)


def test_random_pruning_is_seeded(scheduler):
    from compressor.models import build_unet
    from tests.conftest import TINY_UNET

    kept = []
    for _ in range(2):
        unet = build_unet(TINY_UNET, 0)
        r = prune_unet(unet, scheduler, None, PruneConfig(method="random", ratio=0.25), seed=3)
        kept.append(r.history)
    assert kept[0] == kept[1]
