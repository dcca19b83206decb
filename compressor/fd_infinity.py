"""FD-infinity: the Frechet distance free of its sample-size bias, with paired intervals.

The Frechet distance of ``N`` samples is biased upward by roughly ``c / N``, with a ``c`` that
differs from model to model (Chong and Forsyth, CVPR 2020, "Effectively Unbiased FID and
Inception Score and where to find them"). So two models compared at one ``N`` can swap order
at another, and their ratio drifts toward 1 as ``N`` grows: a gate on it cannot be decided by
adding samples. FD-infinity removes the bias the way their code does: the distance is computed
on nested subsets of the samples at :data:`NESTED_SIZES` sizes evenly spaced in ``N`` (from
:data:`SMALLEST` of the samples to all of them), a line is fitted in ``1 / N`` and its
intercept at ``1 / N = 0`` is the figure.

The subsets are prefixes of one fixed shuffle of the seeds, the same for every model, so the
figures of two models sampled from the same seeds stay paired. Intervals come from the same
replicates as every other quality figure (:class:`compressor.intervals.Resampling`): each
replicate (a group of seeds left out, or a bootstrap draw) is applied to every nested subset
and the whole extrapolation is redone, so the interval includes the extrapolation's own
noise. :data:`REPLICATES` caps the replicates (each costs ``NESTED_SIZES`` covariance
eigendecompositions).

A dense model close to its data has an FD-infinity near zero, so a ratio to it is
ill-conditioned (one of four disjoint seed sets of the demo gave a ratio of 1.6e9); the
difference compressed - dense is the well-conditioned figure (``acceptance.max_fd_increase``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from compressor.intervals import RealStats, Resampling, frechet_replicates

NESTED_SIZES = 12  # subset sizes the line is fitted over (Chong and Forsyth use about 15)
SMALLEST = 0.2  # the smallest subset, as a fraction of the samples (theirs: 5,000 of 50,000)
REPLICATES = 100  # at most this many jackknife groups or bootstrap draws behind an interval


def nested_sizes(n: int, dim: int = 0, count: int = NESTED_SIZES, smallest: float = SMALLEST) -> list[int]:
    """The subset sizes, evenly spaced in N from ``smallest * n`` to ``n`` (distinct, ascending).

    The smallest holds at least ``2 * dim`` samples (at most half of them): below about twice
    the feature dimension the covariance is too poorly estimated for the bias to be linear in
    ``1 / N`` (measured on Gaussian features, tests/test_fd_infinity.py); and at least 3, so a
    subset with one seed left out still has a covariance. Below 4 samples there is one size, ``n``
    (nothing to extrapolate: the figure is the finite-N one)."""
    low = min(n, max(3, int(round(smallest * n)), min(2 * dim, n // 2)))
    return sorted({int(round(v)) for v in np.linspace(low, n, count)})


def nested_masks(n: int, seed: int, sizes: list[int]) -> torch.Tensor:
    """(len(sizes), n) 0/1 float64: subset ``k`` holds the first ``sizes[k]`` seeds of one fixed
    shuffle (deterministic in ``seed`` and ``n``; every model of a comparison uses the same)."""
    rank = np.empty(n, dtype=np.int64)
    rank[np.random.default_rng([int(seed), int(n), 0xFD1]).permutation(n)] = np.arange(n)
    return torch.from_numpy((rank[None, :] < np.asarray(sizes)[:, None]).astype(np.float64))


def intercept(inv_n: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Least-squares intercept at ``1/N = 0`` of lines through (inv_n, values), row-wise (B, K);
    where a row has one size only (K = 1, or a few samples with a left-out seed making two subsets
    the same size) there is no line to fit: its mean value."""
    x_mean, y_mean = inv_n.mean(-1, keepdim=True), values.mean(-1, keepdim=True)
    dx = inv_n - x_mean
    spread = (dx * dx).sum(-1)
    flat = spread <= 1e-12 * x_mean[..., 0] ** 2
    slope = torch.where(flat, 0.0, (dx * (values - y_mean)).sum(-1) / torch.where(flat, 1.0, spread))
    return y_mean[..., 0] - slope * x_mean[..., 0]


def extrapolate(real: RealStats, features: torch.Tensor, masks: torch.Tensor, counts: torch.Tensor | None):
    """FD-infinity of ``features`` (seed order) from nested subsets ``masks`` (K, n); with replicate
    weights ``counts`` (B, n) also the FD-infinity of every replicate, (B,) (else None)."""
    finite = frechet_replicates(real, features, masks)
    value = float(intercept(1.0 / masks.sum(1), finite))
    if counts is None:
        return value, None
    weights = (counts.double()[:, None, :] * masks[None]).reshape(-1, masks.shape[1])  # (B*K, n)
    fds = frechet_replicates(real, features, weights).reshape(counts.shape[0], -1)
    return value, intercept(1.0 / weights.sum(1).reshape(counts.shape[0], -1), fds)


def replicate_plan(boot: Resampling) -> Resampling:
    """The resampling behind FD-infinity intervals: the run's, with at most :data:`REPLICATES`."""
    return dataclasses.replace(boot, resamples=min(boot.resamples, REPLICATES))


@dataclasses.dataclass
class FdInf:
    """One model's FD-infinity and its replicates (paired with every model scored on the same seeds)."""

    value: float
    reps: torch.Tensor


class FdInfScorer:
    """FD-infinity of models sampled from the same seeds, against fixed reference statistics."""

    def __init__(self, real: RealStats, boot: Resampling) -> None:
        self.real = real
        self.boot = replicate_plan(boot)

    def score(self, features: torch.Tensor) -> FdInf:
        """FD-infinity of one model's features (seed order) and its replicates."""
        n = features.shape[0]
        masks = nested_masks(n, self.boot.seed, nested_sizes(n, features.shape[1]))
        value, reps = extrapolate(self.real, features.double(), masks, self.boot.counts(n, 3))
        return FdInf(value, reps)

    def figures(self, score: FdInf, dense: FdInf | None = None) -> dict:
        """``fd_inf`` and ``fd_inf_ci``; against ``dense`` (same seeds) also ``fd_inf_diff`` and
        ``fd_inf_ratio`` with their paired intervals. The ratio's interval is null, and
        ``fd_inf_ratio_note`` says why, when the dense model's interval reaches zero (the ratio
        is then ill-conditioned: any value is within noise of dividing by zero)."""
        b = self.boot
        out: dict = {"fd_inf": score.value, "fd_inf_ci": b.interval(score.value, score.reps)}
        if dense is None:
            return out
        diff = score.value - dense.value
        out["fd_inf_diff"] = diff
        out["fd_inf_diff_ci"] = b.interval(diff, score.reps - dense.reps)
        dense_ci = b.interval(dense.value, dense.reps)
        ratio = score.value / dense.value if dense.value != 0 else float("nan")
        out["fd_inf_ratio"] = ratio
        if dense_ci[0] > 0:
            out["fd_inf_ratio_ci"] = b.interval(ratio, score.reps / dense.reps)
        else:
            out["fd_inf_ratio_ci"] = None
            out["fd_inf_ratio_note"] = (
                f"ill-conditioned: the dense model's FD-infinity interval [{dense_ci[0]:.3g}, "
                f"{dense_ci[1]:.3g}] reaches zero, so the ratio has no interval; read fd_inf_diff"
            )
        return out
