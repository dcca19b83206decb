"""Quality figures with intervals: KID and the Frechet distance against the library, the paired
bootstrap, three-outcome gates, and the starting noise the figures are sampled from."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compressor.intervals import (
    KidReal,
    RealStats,
    Resampling,
    frechet_replicates,
    kid_replicates,
    library_frechet,
    library_kid,
    overlap,
    paired,
    real_floor,
    samples_to_decide,
    ssim_figures,
)
from pipeline.acceptance import FAIL, INCONCLUSIVE, PASS, interval_check, verdict


def _features(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g).abs() + shift


@pytest.mark.parametrize("n,d", [(200, 16), (40, 96)])  # covariance path, and the Gram path (n < d)
def test_frechet_replicates_with_unit_counts_equal_the_library(n, d):
    real, fake = _features(500, d, 0), _features(n, d, 1, shift=0.2)
    ones = torch.ones(1, n, dtype=torch.float64)
    mine = float(frechet_replicates(RealStats.of(real), fake, ones)[0])
    assert mine == pytest.approx(library_frechet(real, fake), rel=1e-5)


def test_large_feature_replicates_downdate_the_left_out_seeds_exactly():
    """Above the one-GEMM size (Inception-like n * d^2), a jackknife replicate's covariance is the
    whole set's minus its left-out seeds'; it equals the replicate's own Frechet distance."""
    n, d = 600, 240  # n * d * d > 2**25: the per-replicate path
    real, fake = _features(800, d, 0), _features(n, d, 1, shift=0.2)
    jack = Resampling(resamples=4, method="jackknife").counts(n)
    boot = Resampling(resamples=2, method="bootstrap").counts(n)
    reps = frechet_replicates(RealStats.of(real), fake, torch.cat([jack, boot]))
    for k in range(4):
        kept = fake[jack[k] > 0]
        assert float(reps[k]) == pytest.approx(library_frechet(real, kept), rel=1e-5)
    direct = frechet_replicates(
        RealStats.of(real), fake.repeat_interleave(boot[0].long(), 0), torch.ones(1, n)
    )
    assert float(reps[4]) == pytest.approx(float(direct[0]), rel=1e-6)  # a bootstrap draw: the plain path


def test_kid_replicates_with_unit_counts_equal_the_library_u_statistic():
    real, fake = _features(120, 8, 0), _features(120, 8, 1, shift=0.3)
    # one subset of every sample: torchmetrics' figure is then the full U-statistic
    mean, std = library_kid(real, fake, seed=0)
    mine = float(kid_replicates(KidReal.of(real), fake, torch.ones(1, 120, dtype=torch.float64))[0])
    assert mine == pytest.approx(mean, rel=1e-9) and std == pytest.approx(0.0, abs=1e-12)


def test_kid_replicates_ignore_a_seed_drawn_twice():
    real, fake = _features(100, 8, 0), _features(50, 8, 1, shift=0.3)
    counts = torch.ones(1, 50, dtype=torch.float64)
    counts[0, 0], counts[0, 1] = 2.0, 0.0  # seed 0 twice, seed 1 left out
    dup = kid_replicates(KidReal.of(real), fake, counts)[0]
    # the same as the U-statistic over the 49 distinct images except for cross-pairs of seed 0 with
    # itself, which do not count: compare with weights written out by hand
    x = fake.double()
    k = (x @ x.T / 8 + 1) ** 3
    w = counts[0]
    within = (w @ k @ w - (w * w) @ k.diagonal()) / (w.sum() ** 2 - (w * w).sum())
    cross = ((real.double() @ x.T / 8 + 1) ** 3).mean(0)
    expected = KidReal.of(real).within + within - 2 * (w @ cross) / w.sum()
    assert float(dup) == pytest.approx(float(expected), rel=1e-12)


def test_bootstrap_is_deterministic_and_its_interval_is_centred_on_the_estimate():
    boot = Resampling(level=0.9, resamples=300, seed=7, method="bootstrap")
    assert torch.equal(
        boot.counts(64), Resampling(level=0.5, resamples=300, seed=7, method="bootstrap").counts(64)
    )
    assert not torch.equal(boot.counts(64), Resampling(resamples=300, seed=8, method="bootstrap").counts(64))
    assert not torch.equal(boot.counts(64, 1), boot.counts(64, 2))
    assert torch.all(boot.counts(64).sum(1) == 64)
    reps = np.random.default_rng(0).normal(5.0, 1.0, 300)  # replicates centred away from the estimate
    low, high = boot.interval(2.0, reps)
    assert low < 2.0 < high and (low + high) / 2 == pytest.approx(2.0, abs=0.2)
    wide = Resampling(level=0.99, resamples=300, method="bootstrap").interval(2.0, reps)
    assert wide[0] < low and wide[1] > high


def test_the_jackknife_leaves_out_groups_of_seeds_and_its_interval_is_the_normal_one():
    jack = Resampling(level=0.95, resamples=10, seed=3)
    w = jack.counts(25)
    assert w.shape == (10, 25) and set(w.unique().tolist()) == {0.0, 1.0}
    assert torch.all((1 - w).sum(0) == 1)  # every seed is left out of exactly one replicate
    assert sorted((1 - w).sum(1).tolist()) == [2.0] * 5 + [3.0] * 5  # near-equal groups
    assert Resampling(resamples=1000).counts(5).tolist() == (1 - torch.eye(5)).tolist() or torch.all(
        (1 - Resampling(resamples=1000).counts(5)).sum(1) == 1
    )  # at most `resamples` seeds: delete-one
    # the mean's jackknife replicates give exactly the textbook standard error s / sqrt(n)
    x = np.random.default_rng(1).normal(size=40)
    reps = [(x.sum() - v) / 39 for v in x]
    low, high = Resampling(level=0.95).interval(float(x.mean()), reps)
    se = x.std(ddof=1) / 40**0.5
    assert (high - low) / 2 == pytest.approx(1.959964 * se, rel=1e-6)
    # independent samples (two halves) add their variances
    both = Resampling().interval(0.0, reps, reps)
    assert (both[1] - both[0]) == pytest.approx(2**0.5 * (high - low), rel=1e-9)
    with pytest.raises(ValueError, match="jackknife or bootstrap"):
        Resampling(method="subsample")


def test_the_jackknife_standard_error_matches_the_spread_over_fresh_seeds_where_the_bootstrap_does_not():
    """Synthetic 'dense' and 'compressed' features from shared seeds: 80 fresh draws give the true
    spread of the Frechet distance and of the ratio; one draw's jackknife recovers both."""
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(16, 16, generator=g) / 4

    def draw(n):
        z = torch.randn(n, 16, generator=g)
        return torch.relu(z @ mix + 0.3), torch.relu((z + 0.3 * torch.randn(n, 16, generator=g)) @ mix + 0.32)

    real = RealStats.of(draw(2000)[0])
    ones = torch.ones(1, 128, dtype=torch.float64)
    fresh = [draw(128) for _ in range(80)]
    fd = np.array([[float(frechet_replicates(real, x, ones)[0]) for x in pair] for pair in fresh])
    true_fd, true_ratio = fd[:, 0].std(), (fd[:, 1] / fd[:, 0]).std()
    dense, compressed = draw(128)

    def se(method):
        r = Resampling(resamples=1000, method=method)
        w = r.counts(128)
        a, b = frechet_replicates(real, dense, w), frechet_replicates(real, compressed, w)
        fd_ci, ratio_ci = r.interval(1.0, a), r.interval(1.0, b / a)
        return (fd_ci[1] - fd_ci[0]) / 3.92, (ratio_ci[1] - ratio_ci[0]) / 3.92

    jack_fd, jack_ratio = se("jackknife")
    assert 0.6 < jack_fd / true_fd < 1.7 and 0.6 < jack_ratio / true_ratio < 1.7
    boot_fd, _ = se("bootstrap")
    assert boot_fd > 1.4 * jack_fd  # duplicated seeds inflate the Frechet distance's spread


def test_the_paired_ratio_interval_is_far_tighter_than_independent_intervals():
    boot = Resampling(resamples=300, seed=0)
    real = _features(600, 8, 0)
    dense = _features(128, 8, 1, shift=0.3)
    compressed = dense + 0.02 * _features(128, 8, 2)  # the same seeds: nearly the same images

    def score(x):
        from compressor.intervals import ModelScore

        reps = frechet_replicates(RealStats.of(real), x, boot.counts(128))
        return ModelScore(x, library_frechet(real, x), 0.0, 0.0, reps, reps)

    a, b = score(compressed), score(dense)
    figures = paired(boot, a, b)
    low, high = figures["fd_ratio_ci"]
    assert low <= figures["fd_ratio"] <= high
    fd_a, fd_b = boot.interval(a.fd, a.fd_reps), boot.interval(b.fd, b.fd_reps)
    independent = (fd_a[1] / fd_b[0]) - (fd_a[0] / fd_b[1])  # the ratio's range from two intervals
    assert high - low < independent / 5


def test_ssim_interval_brackets_the_mean_and_is_zero_width_for_identical_images():
    boot = Resampling(resamples=200)
    g = torch.Generator().manual_seed(0)
    a = torch.rand(32, 1, 16, 16, generator=g)
    same = ssim_figures(boot, a, a)
    assert same["ssim_vs_dense"] == pytest.approx(1.0) and same["ssim_vs_dense_ci"] == pytest.approx(
        [1.0, 1.0]
    )
    noisy = (a + 0.3 * torch.rand(32, 1, 16, 16, generator=g)).clamp(0, 1)
    fig = ssim_figures(boot, noisy, a)
    assert fig["ssim_vs_dense_ci"][0] < fig["ssim_vs_dense"] < fig["ssim_vs_dense_ci"][1] < 1.0


def test_kid_on_scaled_digits_features_separates_a_clearly_worse_model():
    """Held-out real digits against noisy ones, both scored against the reference digits."""
    from compressor.data import digits_images
    from compressor.features import load_digits_features
    from compressor.image_quality import FeatureAdapter, make_scorer

    images = (digits_images(16, 1) + 1) / 2
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))  # writers mixed
    reference, held_out = images[order[:1200]], images[order[1200:1456]]
    noise = torch.randn(held_out.shape, generator=torch.Generator().manual_seed(0))
    worse = (held_out + 0.35 * noise).clamp(0, 1)
    feature = FeatureAdapter(load_digits_features(), 1, 64)
    boot = Resampling(resamples=200)
    scorer = make_scorer(reference, feature, "fd_digits", boot)
    assert scorer.kid_scale == pytest.approx(float(scorer.real.std()))  # scaled by the reference's spread
    good, bad = (scorer.figures(scorer.score(x), "fd_digits") for x in (held_out, worse))
    assert good["kid_ci"][0] < 0 < good["kid_ci"][1]  # real vs real: zero within noise
    assert bad["kid_ci"][0] > good["kid_ci"][1] and bad["fd_digits_ci"][0] > good["fd_digits_ci"][1]
    assert abs(good["kid"]) < 0.1 < bad["kid"] < 1.0  # figures of order 0.01-0.1, as Inception KIDs are
    assert good["kid_std"] >= 0


def test_real_floor_has_an_interval_around_it():
    boot = Resampling(resamples=100)
    value, (low, high) = real_floor(_features(400, 8, 0), boot)
    assert low < value < high
    assert real_floor(_features(400, 8, 0), boot) == (value, [low, high])  # deterministic


def test_samples_to_decide_scales_with_the_square_of_the_interval_width():
    # estimate 1.2, limit 1.5, upper half-width 0.6 at 256 samples: 4x the samples halves it to 0.3
    assert samples_to_decide(1.2, [0.6, 1.8], 1.5, 256) == 1024
    assert samples_to_decide(1.5, [1.0, 2.0], 1.5, 256) is None
    assert overlap([1, 2], [2, 3]) and not overlap([1, 2], [2.1, 3]) and not overlap(None, [1, 2])


@pytest.mark.parametrize(
    "interval,direction,outcome",
    [
        ([0.8, 1.2], "<=", PASS),
        ([1.6, 1.9], "<=", FAIL),
        ([1.2, 1.8], "<=", INCONCLUSIVE),
        ([1.6, 1.9], ">=", PASS),
        ([0.8, 1.2], ">=", FAIL),
        ([1.2, 1.8], ">=", INCONCLUSIVE),
    ],
)
def test_a_quality_gate_has_three_outcomes_from_its_interval(interval, direction, outcome):
    value = interval[0] + 0.1
    check = interval_check("max_fd_ratio", value, interval, 1.5, direction, "[x]", samples=256, level=0.95)
    assert check.outcome == outcome and check.passed == (outcome == PASS)
    line = check.line()
    assert line.startswith(outcome.upper()) and f"[{interval[0]:.4g}, {interval[1]:.4g}]" in line
    assert "95% interval" in line and "256 samples" in line
    if outcome == INCONCLUSIVE:
        assert "inconclusive" in line and f"about {check.decide_at} samples would likely decide it" in line
        assert check.decide_at > 256


def test_the_verdict_is_fail_before_inconclusive_before_pass():
    def gate(interval):
        return interval_check("g", 1.0, interval, 1.5, "<=", "")

    assert verdict([gate([0.5, 1.4])]) == PASS
    assert verdict([gate([0.5, 1.4]), gate([1.0, 2.0])]) == INCONCLUSIVE
    assert verdict([gate([1.6, 2.0]), gate([1.0, 2.0])]) == FAIL


def test_a_record_without_intervals_is_gated_on_its_figure_and_says_so():
    check = interval_check("min_ssim", 0.95, None, 0.9, ">=", "[vs dense]")
    assert check.outcome == PASS and "no interval recorded" in check.line()


def test_starting_noise_is_standard_normal_and_uncorrelated_across_seeds_and_pixels():
    from compressor.sampling import initial_noise

    noise = initial_noise((1, 16, 16), list(range(2000))).reshape(2000, -1).double()  # 2000 x 256
    n = noise.numel()
    assert abs(float(noise.mean())) < 4 / n**0.5  # mean 0 within 4 standard errors
    assert float(noise.var()) == pytest.approx(1.0, abs=4 * (2 / n) ** 0.5)
    from scipy import stats

    assert stats.kstest(noise.flatten().numpy()[:20000], "norm").pvalue > 1e-3
    # correlation between pixels (over seeds) and between seeds (over pixels): all near zero
    pixels = torch.corrcoef(noise.T)
    off = pixels[~torch.eye(256, dtype=torch.bool)]
    assert float(off.abs().max()) < 5 / 2000**0.5
    seeds = torch.corrcoef(noise[:300])
    off = seeds[~torch.eye(300, dtype=torch.bool)]
    assert float(off.abs().max()) < 5.5 / 256**0.5
    assert float(off.mean()) == pytest.approx(0.0, abs=0.01)
    # neighbouring seeds are not shifted copies of each other (a classic seeding mistake)
    assert float(torch.corrcoef(torch.stack([noise[0, 1:], noise[1, :-1]]))[0, 1]).__abs__() < 0.3
