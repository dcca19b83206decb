"""Quality figures with their uncertainty: KID beside the Frechet distance, and paired intervals.

A Frechet distance of a few hundred samples moves more with the seeds than the effects it
is asked to decide, and it is biased upward at small sample counts. So every figure here
comes with an interval from **replicates paired over the seeds**: image ``i`` of every
model starts from the noise of the same seed, so one replicate (a set of seeds left out,
or drawn again) is applied to every model at once, and the interval of a ratio or
difference (compressed / dense) is that of the replicated ratio, far tighter than two
independent intervals.

* The point figures come from the library: the Frechet distance from torchmetrics'
  ``FrechetInceptionDistance`` and KID (Binkowski et al. 2018: an unbiased estimate of the
  squared MMD under the cubic polynomial kernel, mean and spread over subsets) from
  ``KernelInceptionDistance``, both fed the features extracted once (:class:`Identity`).
* The replicates are computed here from the same statistics, vectorised: a replicate is a
  weight vector ``w`` over the seeds; the Frechet distance uses the weighted mean and
  covariance (exactly those of the replicate's set), KID the unbiased U-statistic over
  pairs of distinct seeds. With ``w = 1`` both equal the library's figures (tested).
* :class:`Resampling` turns replicates into an interval: by default the paired jackknife
  (estimate +- z * standard error), optionally the paired bootstrap. Either is the spread
  of the figure **at this sample count** (what another draw of as many seeds would likely
  give); neither removes the Frechet distance's small-sample bias, so figures are only
  compared at equal sample counts (docs/quality.md).

Everything is deterministic from the resampling seed (the run's seed) and the sample count.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import torch
from torch import nn

DEFAULT_LEVEL = 0.95
DEFAULT_RESAMPLES = 1000
KID_SUBSETS = 100  # torchmetrics' default
KID_SUBSET_SIZE = 1000  # torchmetrics' (and clean-fid's) default, capped by the sample counts
_CHUNK_BYTES = 64 << 20  # covariance replicates held at once


class Identity(nn.Module):
    """A "feature extractor" that returns its input: feeds precomputed features to torchmetrics."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


METHODS = ("jackknife", "bootstrap")


@dataclass(frozen=True)
class Resampling:
    """Replicates over the seeds, the same for every model of a comparison (paired), and intervals.

    ``jackknife`` (default): each replicate leaves one group of seeds out (one seed each when
    there are at most ``resamples`` seeds); the interval is the estimate +- z * the jackknife
    standard error. ``bootstrap``: ``resamples`` draws of the seeds with replacement; the
    interval is the replicates' central range re-centred on the estimate. Measured on the
    demo against the spread over five fresh seed sets (docs/quality.md): the jackknife's
    standard error of the Frechet distance is 0.8x to 1.5x that spread, the bootstrap's wider
    (a seed drawn twice changes the count of distinct samples, on which the distance's
    small-sample bias depends); for the ratio the jackknife errs wide (1.4x to 3.8x), the
    bootstrap less (0.8x to 2.1x).
    """

    level: float = DEFAULT_LEVEL
    resamples: int = DEFAULT_RESAMPLES
    seed: int = 0
    method: str = "jackknife"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"interval method {self.method!r}: choose {' or '.join(METHODS)}")

    def counts(self, n: int, stream: int = 0) -> torch.Tensor:
        """(replicates, n) float64 weights of each seed in each replicate (0/1 for the jackknife,
        draw counts for the bootstrap). Deterministic in (seed, n, stream); ``stream`` gives an
        independent set (e.g. the two halves of the real-data floor)."""
        rng = np.random.default_rng([int(self.seed), int(n), int(stream), 0xB0075])
        if self.method == "jackknife":
            groups = min(n, self.resamples)
            which = np.empty(n, dtype=np.int64)
            which[rng.permutation(n)] = np.arange(n) % groups  # near-equal groups, seeds shuffled
            return torch.from_numpy((which[None, :] != np.arange(groups)[:, None]).astype(np.float64))
        idx = rng.integers(0, n, size=(self.resamples, n))
        counts = np.zeros((self.resamples, n))
        np.add.at(counts, (np.arange(self.resamples)[:, None], idx), 1.0)
        return torch.from_numpy(counts)

    def interval(self, estimate: float, *replicates) -> list[float]:
        """``[low, high]`` at ``level`` from the replicates of ``estimate``. Jackknife: several
        replicate sets (independent samples, e.g. two halves) add their variances."""
        sets = [np.asarray(r, dtype=np.float64) for r in replicates]
        if not math.isfinite(estimate) or any(r.size == 0 or not np.isfinite(r).all() for r in sets):
            return [float("nan"), float("nan")]
        if self.method == "jackknife":
            var = sum((r.size - 1) / r.size * float(((r - r.mean()) ** 2).sum()) for r in sets)
            half = NormalDist().inv_cdf(0.5 + self.level / 2) * math.sqrt(var)
            return [float(estimate - half), float(estimate + half)]
        (reps,) = sets
        tail = (1 - self.level) / 2
        low, high = np.quantile(reps, [tail, 1 - tail])
        shift = estimate - float(reps.mean())
        return [float(low + shift), float(high + shift)]

    def describe(self, n: int | None = None) -> dict:
        """What a record says about its intervals (``resamples``: replicates behind each, for n seeds)."""
        used = min(n, self.resamples) if n and self.method == "jackknife" else self.resamples
        how = (
            "paired delete-a-group jackknife over seeds (one seed a group when resamples >= samples); "
            "estimate +- z * standard error"
            if self.method == "jackknife"
            else "paired bootstrap over seeds; percentile interval re-centred on the estimate"
        )
        return {"level": self.level, "resamples": used, "seed": self.seed, "method": self.method, "how": how}


Bootstrap = Resampling  # the name


# -- the Frechet distance ------------------------------------------------------------------------


def frechet_from_stats(mu1: torch.Tensor, s1: torch.Tensor, mu2: torch.Tensor, s2: torch.Tensor) -> float:
    """The Frechet distance between two Gaussians (as torchmetrics computes it), float64."""
    mu1, s1, mu2, s2 = (t.double() for t in (mu1, s1, mu2, s2))
    c = torch.linalg.eigvals(s1 @ s2).sqrt().real.sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * c)


def library_frechet(real: torch.Tensor, fake: torch.Tensor) -> float:
    """torchmetrics' Frechet distance between two feature sets (n, d)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=Identity(real.shape[1]), normalize=False)
    metric.update(real.float(), real=True)
    metric.update(fake.float(), real=False)
    return float(metric.compute())


@dataclass
class RealStats:
    """The reference features' mean, covariance and its square root (computed once)."""

    mu: torch.Tensor
    cov: torch.Tensor
    root: torch.Tensor  # symmetric square root of cov

    @classmethod
    def of(cls, x: torch.Tensor) -> RealStats:
        x = x.double()
        mu = x.mean(0)
        cov = torch.cov(x.T)
        vals, vecs = torch.linalg.eigh(cov)
        root = (vecs * vals.clamp(min=0).sqrt()) @ vecs.T
        return cls(mu, cov, root)


def _chunk(resamples: int, per_item: int) -> int:
    return max(1, min(resamples, _CHUNK_BYTES // max(1, 8 * per_item)))


def _second_moment(x: torch.Tensor, weights: torch.Tensor, total: torch.Tensor | None) -> torch.Tensor:
    """sum_i w_i x_i x_i^T. A replicate that leaves a few seeds out (0/1 weights, mostly 1: the
    jackknife) is ``total`` minus the left-out rows' part, (n / groups) d^2 work instead of n d^2."""
    left_out = weights == 0
    if total is not None and int(left_out.sum()) * 2 < len(weights) and bool((weights[~left_out] == 1).all()):
        rows = x[left_out]
        return total - rows.T @ rows
    return (x.T * weights) @ x


def frechet_replicates(real: RealStats, fake: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The Frechet distance to ``real`` of each resample of ``fake`` (counts: (B, n)), float64 (B,).

    tr sqrt(S_r S_f) is the sum of square roots of the eigenvalues of R S_f R (R = S_r^1/2),
    symmetric: one ``eigvalsh`` per resample, of size d, or of the n x n Gram matrix when
    there are fewer samples than features (same non-zero eigenvalues).
    """
    x = fake.double()
    n, d = x.shape
    out = []
    gram = n < d
    sr = real.cov
    xs = x @ sr if gram else None  # (n, d)
    p = xs @ x.T if gram else None  # X S_r X^T
    # second moments of every sample as one row each: a resample's covariance is one GEMM
    outer = (x[:, :, None] * x[:, None, :]).reshape(n, d * d) if not gram and n * d * d <= 1 << 25 else None
    total = x.T @ x if not gram and outer is None else None  # a jackknife replicate downdates it
    tr_r = real.cov.trace()
    step = _chunk(counts.shape[0], (n if gram else d) ** 2 * 3)
    for w in counts.double().split(step):
        m = w.sum(1, keepdim=True)  # (b, 1), = n
        mu = (w @ x) / m  # (b, d)
        if gram:
            v = xs @ mu.T  # (n, b): X S_r mu
            s = ((mu @ sr) * mu).sum(1)  # (b,)
            mat = p[None] - v.T[:, :, None] - v.T[:, None, :] + s[:, None, None]
            sw = w.sqrt()
            mat = sw[:, :, None] * mat * sw[:, None, :] / (m[:, :, None] - 1)
            tr_f = ((w @ (x * x)).sum(1) - m[:, 0] * (mu * mu).sum(1)) / (m[:, 0] - 1)
        else:
            second = (
                (w @ outer).reshape(-1, d, d)
                if outer is not None
                else torch.stack([_second_moment(x, r, total) for r in w])
            )
            cov = (second - m[:, :, None] * mu[:, :, None] * mu[:, None, :]) / (m[:, :, None] - 1)
            tr_f = cov.diagonal(dim1=1, dim2=2).sum(1)
            mat = real.root @ cov @ real.root
        vals = torch.linalg.eigvalsh(mat).clamp(min=0).sqrt().sum(1)
        diff = ((mu - real.mu) ** 2).sum(1)
        out.append(diff + tr_r + tr_f - 2 * vals)
    return torch.cat(out)


def frechet_pair_replicates(
    a: torch.Tensor, b: torch.Tensor, counts_a: torch.Tensor, counts_b: torch.Tensor
) -> torch.Tensor:
    """The Frechet distance between resamples of two feature sets (both resampled), (B,)."""
    out = []
    for wa, wb in zip(counts_a.double(), counts_b.double(), strict=True):
        stats = []
        for x, w in ((a.double(), wa), (b.double(), wb)):
            m = w.sum()
            mu = (w @ x) / m
            xc = x - mu
            stats += [mu, (xc.T * w) @ xc / (m - 1)]
        out.append(frechet_from_stats(*stats))
    return torch.tensor(out, dtype=torch.float64)


# -- KID ---------------------------------------------------------------------------------------------


def _kernel(a: torch.Tensor, b: torch.Tensor, d: int) -> torch.Tensor:
    """torchmetrics' ``poly_kernel`` (degree 3, gamma 1/d, coef 1), float64."""
    return (a.double() @ b.double().T / d + 1.0) ** 3


def library_kid(real: torch.Tensor, fake: torch.Tensor, seed: int) -> tuple[float, float]:
    """torchmetrics' KID (mean, std over subsets) between two feature sets, deterministic in ``seed``."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(KID_SUBSET_SIZE, real.shape[0], fake.shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "will save all extracted features": they are
        metric = KernelInceptionDistance(
            feature=Identity(real.shape[1]), subsets=KID_SUBSETS, subset_size=size, normalize=False
        )
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):  # its subsets come from torch's global generator
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


@dataclass
class KidReal:
    """The reference features and their within-set kernel mean (pairs of distinct images)."""

    x: torch.Tensor
    within: float

    @classmethod
    def of(cls, x: torch.Tensor) -> KidReal:
        x = x.double()
        n, d = x.shape
        total, diag = 0.0, 0.0
        for rows in x.split(max(1, (16 << 20) // (8 * n))):
            k = _kernel(rows, x, d)
            total += float(k.sum())
        diag = float(((x * x).sum(1) / d + 1.0).pow(3).sum())
        return cls(x, (total - diag) / (n * (n - 1)))


def kid_replicates(real: KidReal, fake: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The unbiased KID (squared MMD, U-statistic) of each resample of ``fake``, (B,) float64.

    Within the resample only pairs of distinct seeds count (a seed drawn twice is not a pair
    of two images), so ``w = 1`` gives the plain U-statistic and duplicates add no bias.
    """
    x = fake.double()
    n, d = x.shape
    kff = _kernel(x, x, d)
    kdiag = kff.diagonal()
    cross = sum(_kernel(rows, x, d).sum(0) for rows in real.x.split(max(1, (16 << 20) // (8 * n))))
    cross = cross / real.x.shape[0]  # mean kernel of each fake image with the real set
    w = counts.double()
    m = w.sum(1)
    pairs = ((w @ kff) * w).sum(1) - (w * w) @ kdiag
    within = pairs / (m * m - (w * w).sum(1))
    return real.within + within - 2 * (w @ cross) / m


# -- SSIM ------------------------------------------------------------------------------------------


def ssim_per_image(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM of each image pair (data range 1), torchmetrics' kernel as
    :func:`compressor.image_quality.ssim`."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    size = min(a.shape[-1], a.shape[-2])
    kernel = min(11, size - (1 - size % 2))
    return structural_similarity_index_measure(
        a.float(), b.float(), data_range=1.0, kernel_size=kernel, reduction="none"
    ).double()


# -- one comparison -----------------------------------------------------------------------------------


@dataclass
class ModelScore:
    """One model's features and bootstrap replicates (not recorded; :meth:`Scorer.figures` is)."""

    features: torch.Tensor
    fd: float
    kid: float
    kid_std: float
    fd_reps: torch.Tensor
    kid_reps: torch.Tensor


class Scorer:
    """Frechet distance and KID of generated images against fixed reference features, with the
    paired bootstrap intervals of every figure (compressed / dense ratios, SSIM vs dense).

    ``extract`` maps images in [0, 1] to (n, d) features. ``kid_scale``: features are divided
    by it for KID only (the cubic kernel wants features of order one: Inception's are, the
    digits network's are not; ``"auto"`` = the reference features' standard deviation).
    """

    def __init__(self, reference_features: torch.Tensor, extract, boot: Resampling, kid_scale=1.0) -> None:
        self.extract = extract
        self.boot = boot
        real = reference_features.double()
        self.real = real
        self.kid_scale = float(real.std()) if kid_scale == "auto" else float(kid_scale)
        self.stats = RealStats.of(real)
        self.kid_real = KidReal.of(real / self.kid_scale)

    def score(self, images: torch.Tensor) -> ModelScore:
        """Features, library figures and replicates of one model's images (seed order)."""
        feats = self.extract(images).double()
        counts = self.boot.counts(feats.shape[0])
        kid, kid_std = library_kid(self.kid_real.x, feats / self.kid_scale, self.boot.seed)
        return ModelScore(
            features=feats,
            fd=library_frechet(self.real, feats),
            kid=kid,
            kid_std=kid_std,
            fd_reps=frechet_replicates(self.stats, feats, counts),
            kid_reps=kid_replicates(self.kid_real, feats / self.kid_scale, counts),
        )

    def figures(self, score: ModelScore, metric: str, dense: ModelScore | None = None) -> dict:
        """The recorded figures of one model: ``<metric>``, ``kid``, ``kid_std`` and their ``*_ci``;
        against ``dense`` (same seeds) also ``fd_ratio`` and ``fd_ratio_ci`` (SSIM: :func:`ssim_figures`)."""
        b = self.boot
        out = {
            metric: score.fd,
            f"{metric}_ci": b.interval(score.fd, score.fd_reps),
            "kid": score.kid,
            "kid_std": score.kid_std,
            "kid_ci": b.interval(score.kid, score.kid_reps),
        }
        if dense is not None:
            out.update(paired(b, score, dense))
        return out


def paired(boot: Resampling, score: ModelScore, dense: ModelScore) -> dict:
    """``fd_ratio`` of ``score`` to ``dense`` (the Frechet distance at this sample count) and
    ``kid_diff`` (KID of ``score`` minus ``dense``), each with its paired interval."""
    if score.fd_reps.shape != dense.fd_reps.shape:
        raise ValueError("paired figures need both models scored on the same seeds")
    ratio = score.fd / dense.fd
    kid_diff = score.kid - dense.kid
    return {
        "fd_ratio": ratio,
        "fd_ratio_ci": boot.interval(ratio, score.fd_reps / dense.fd_reps),
        "kid_diff": kid_diff,
        "kid_diff_ci": boot.interval(kid_diff, score.kid_reps - dense.kid_reps),
    }


def ssim_figures(boot: Resampling, images: torch.Tensor, dense: torch.Tensor) -> dict:
    """``ssim_vs_dense`` (mean over image pairs from the same seeds) and its bootstrap interval."""
    per_image = ssim_per_image(images, dense)
    counts = boot.counts(per_image.shape[0])
    value = float(per_image.mean())
    return {
        "ssim_vs_dense": value,
        "ssim_vs_dense_ci": boot.interval(value, counts @ per_image / counts.sum(1)),
    }


def difference(boot: Resampling, a: ModelScore, b: ModelScore) -> dict:
    """``a.fd - b.fd`` with its paired interval (two models sampled from the same seeds)."""
    value = a.fd - b.fd
    return {"fd_diff": value, "fd_diff_ci": boot.interval(value, a.fd_reps - b.fd_reps)}


def real_floor(features: torch.Tensor, boot: Resampling) -> tuple[float, list[float]]:
    """The Frechet distance between two halves of the reference set, and its interval
    (each half resampled on its own): the distance two real sets of that size show."""
    half = features.shape[0] // 2
    a, b = features[:half].double(), features[half : 2 * half].double()
    value = library_frechet(a, b)
    wa, wb = boot.counts(half, 1), boot.counts(half, 2)
    if boot.method == "bootstrap":  # both halves drawn together
        return value, boot.interval(value, frechet_pair_replicates(a, b, wa, wb))
    keep = torch.ones_like(wa)  # jackknife: leave groups out of one half, then of the other
    reps_a = frechet_pair_replicates(a, b, wa, keep)
    reps_b = frechet_pair_replicates(a, b, keep, wb)
    return value, boot.interval(value, reps_a, reps_b)


def overlap(a: list[float] | None, b: list[float] | None) -> bool:
    """Whether two intervals share a point (None: a bare figure, treated as no interval)."""
    if not a or not b:
        return False
    return a[0] <= b[1] and b[0] <= a[1]


def samples_to_decide(estimate: float, interval: list[float], limit: float, n: int) -> int | None:
    """The sample count at which the interval would likely clear ``limit`` (its width shrinks as
    1/sqrt(n)); None when the estimate sits on the limit (no count decides it)."""
    distance = abs(estimate - limit)
    if distance == 0 or not all(math.isfinite(v) for v in interval):
        return None
    side = interval[1] - estimate if limit >= estimate else estimate - interval[0]
    need = n * (max(side, 0.0) / distance) ** 2
    return max(n, int(math.ceil(need / 256.0)) * 256)
