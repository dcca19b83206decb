"""FD-infinity against a known truth, and the repeated intervals of sampling until decided."""

from __future__ import annotations

import pytest
import torch

from compressor.config import AcceptanceConfig
from compressor.fd_infinity import FdInfScorer, intercept, nested_masks, nested_sizes
from compressor.intervals import RealStats, Resampling, frechet_from_stats, frechet_replicates
from compressor.sequential import look_level, look_sizes, pocock_constant
from pipeline.acceptance import FAIL, INCONCLUSIVE, PASS, quality_checks
from rundir.records import QualityMetrics

D = 64  # the digits feature network's width


def _gaussian_case(seed: int = 0):
    """A reference sample and a generator whose Frechet distance to the reference's Gaussian is
    known in closed form (the quality stage scores against the reference's mean and covariance)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(D, D, generator=g, dtype=torch.float64) / D**0.5
    cov_r = a @ a.T + 0.1 * torch.eye(D, dtype=torch.float64)
    reference = torch.randn(1797, D, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov_r).T
    real = RealStats.of(reference)
    mu = 0.15 * torch.randn(D, generator=g, dtype=torch.float64)
    cov = 1.05**2 * cov_r
    truth = frechet_from_stats(real.mu, real.cov, mu, cov)
    chol = torch.linalg.cholesky(cov)

    def draw(n: int, draw_seed: int) -> torch.Tensor:
        gg = torch.Generator().manual_seed(1000 + draw_seed)
        return mu + torch.randn(n, D, generator=gg, dtype=torch.float64) @ chol.T

    return real, truth, draw


def test_nested_subsets_are_prefixes_of_one_shuffle():
    sizes = nested_sizes(1024, D)
    assert sizes[0] == 205 and sizes[-1] == 1024 and len(sizes) == 12 and sizes == sorted(sizes)
    assert nested_sizes(256, D)[0] == 128  # at least twice the feature width
    assert nested_sizes(4, D) == [3, 4] and nested_sizes(3, D) == [3]  # a left-out seed keeps 2
    masks = nested_masks(1024, 3, sizes)
    assert masks.sum(1).tolist() == sizes
    assert bool((masks[1:] >= masks[:-1]).all())  # each subset holds the one before
    assert torch.equal(masks, nested_masks(1024, 3, sizes)) and not torch.equal(
        masks, nested_masks(1024, 4, sizes)
    )


def test_intercept_recovers_a_line_in_one_over_n():
    inv_n = 1.0 / torch.tensor([[100.0, 200.0, 400.0, 800.0]], dtype=torch.float64)
    assert float(intercept(inv_n, 3.0 + 250.0 * inv_n)) == pytest.approx(3.0)
    one = torch.tensor([[0.25]], dtype=torch.float64)
    assert float(intercept(one, torch.tensor([[7.0]], dtype=torch.float64))) == 7.0  # one size: itself


@pytest.mark.parametrize("n", [256, 1024])
def test_fd_infinity_covers_the_truth_where_the_finite_figure_does_not(n):
    """On Gaussian features with a known Frechet distance, FD-infinity's 95% interval holds the
    truth on most seed sets; the finite-N figure's interval (biased by about c/N) on none."""
    real, truth, draw = _gaussian_case()
    inf_hits = finite_hits = 0
    sets = 10
    for s in range(sets):
        x = draw(n, s)
        boot = Resampling(0.95, 1000, s, "jackknife")
        scorer = FdInfScorer(real, boot)
        low, high = scorer.figures(scorer.score(x))["fd_inf_ci"]
        inf_hits += low <= truth <= high
        finite = float(frechet_replicates(real, x, torch.ones(1, n, dtype=torch.float64))[0])
        f_low, f_high = boot.interval(finite, frechet_replicates(real, x, boot.counts(n)))
        finite_hits += f_low <= truth <= f_high
        assert finite > truth  # the small-sample bias is upward
    assert inf_hits >= 8, f"FD-infinity covered the truth {inf_hits}/{sets} times at n={n}"
    assert finite_hits <= 1, f"the finite-N figure covered the truth {finite_hits}/{sets} times"


def test_paired_difference_and_an_ill_conditioned_ratio():
    real, _, draw = _gaussian_case()
    x = draw(512, 0)
    noise = torch.randn(512, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    near = real.mu + noise @ torch.linalg.cholesky(real.cov).T  # the reference's own Gaussian
    boot = Resampling(0.95, 1000, 0, "jackknife")
    scorer = FdInfScorer(real, boot)
    far, dense = scorer.score(x), scorer.score(near)
    figures = scorer.figures(far, dense)
    assert figures["fd_inf_diff"] == pytest.approx(far.value - dense.value)
    low, high = figures["fd_inf_diff_ci"]
    assert low <= figures["fd_inf_diff"] <= high and low > 0  # the shifted model is clearly further
    # the dense model here is the reference's own Gaussian: its FD-infinity is about 0
    assert scorer.figures(dense)["fd_inf_ci"][0] <= 0
    assert figures["fd_inf_ratio_ci"] is None and "ill-conditioned" in figures["fd_inf_ratio_note"]


def test_pocock_constants_match_the_published_table():
    # Jennison and Turnbull, Table 2.1 (two-sided 5%, equally spaced looks)
    for looks, published in ((2, 2.178), (3, 2.289), (4, 2.361), (5, 2.413)):
        assert pocock_constant([k / looks for k in range(1, looks + 1)], 0.95) == pytest.approx(
            published, abs=0.01
        )
    assert pocock_constant([1.0], 0.95) == pytest.approx(1.959964, abs=1e-6)
    assert look_sizes(1024, 3072) == [1024, 2048, 3072] and look_sizes(1024, 1000) == [1000]
    assert look_level([1024], 0.95) == pytest.approx(0.95)
    assert look_level([1024, 2048, 3072], 0.95) == pytest.approx(0.978, abs=0.002)


def test_repeated_intervals_keep_their_level_across_looks():
    """Simulated nested means: a plain 95% interval checked at three looks misses the truth at some
    look far more than 5% of the time; the repeated interval does not."""
    g = torch.Generator().manual_seed(0)
    sizes = [100, 200, 300]
    data = torch.randn(4000, sizes[-1], generator=g, dtype=torch.float64)
    from statistics import NormalDist

    def missed(level: float) -> float:
        z = NormalDist().inv_cdf(0.5 + level / 2)
        miss = torch.zeros(data.shape[0], dtype=torch.bool)
        for n in sizes:
            mean = data[:, :n].mean(1)
            miss |= mean.abs() > z / n**0.5
        return float(miss.double().mean())

    assert missed(0.95) > 0.09  # naive: about 11%
    assert missed(look_level(sizes, 0.95)) == pytest.approx(0.05, abs=0.012)


def _quality(**finetuned) -> QualityMetrics:
    dense = {"fd_digits": 6.0, "fd_inf": 0.4, "fd_inf_ci": [-0.5, 1.3]}
    return QualityMetrics(
        models={"dense": dense, "finetuned": finetuned}, frechet_metric="fd_digits", num_samples=1024,
        steps=50, scheduler="ddim", interval={"level": 0.95},
    )  # fmt: skip


def test_the_frechet_gates_read_fd_infinity_and_a_ratio_to_zero_is_undecidable():
    figures = {
        "fd_inf": 3.4, "fd_inf_diff": 3.0, "fd_inf_diff_ci": [1.5, 4.5], "fd_inf_ratio": 8.5,
        "fd_inf_ratio_ci": None, "fd_inf_ratio_note": "ill-conditioned: ...", "kid_diff": 0.002,
        "kid_diff_ci": [0.001, 0.003], "fd_ratio": 1.2, "fd_ratio_ci": [1.0, 1.4],
    }  # fmt: skip
    limits = AcceptanceConfig(max_fd_ratio=1.5, max_fd_increase=5.0, max_kid_increase=0.002)
    checks = {c.name: c for c in quality_checks(limits, _quality(**figures))}
    ratio = checks["max_fd_ratio"]
    # the finite-N ratio (1.2, interval below 1.5) is not what decides: FD-infinity's has no interval
    assert ratio.outcome == INCONCLUSIVE and ratio.ill_posed and ratio.measured == 8.5
    assert "undecidable" in ratio.line() and "acceptance.max_fd_increase" in ratio.line()
    assert (
        checks["max_fd_increase"].outcome == PASS
        and "dense's own FD-infinity 0.4" in checks["max_fd_increase"].line()
    )
    assert checks["max_kid_increase"].outcome == INCONCLUSIVE  # [0.001, 0.003] straddles 0.002
    tighter = AcceptanceConfig(max_fd_increase=1.0, max_kid_increase=0.0005)
    assert {c.outcome for c in quality_checks(tighter, _quality(**figures))} == {FAIL}
    # a record written before FD-infinity: the finite-N ratio, as before
    old = {k: v for k, v in figures.items() if not k.startswith("fd_inf")}
    (legacy,) = quality_checks(AcceptanceConfig(max_fd_ratio=1.5), _quality(**old))
    assert (
        legacy.outcome == PASS and legacy.interval == [1.0, 1.4] and "at this sample count" in legacy.line()
    )
