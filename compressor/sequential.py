"""Sampling until a gate decides: repeated confidence intervals with Pocock's boundary.

``quality.num_samples: auto`` draws images in chunks and re-decides every quality gate after
each chunk (a *look*). Re-checking an ordinary 95% interval at every look would make a wrong
decision more likely than 5% (each look is another chance for noise to cross a limit), so
every look's interval is a **repeated confidence interval** (Jennison and Turnbull): the
estimate +- ``c`` standard errors, with one constant ``c`` for all looks (Pocock 1977) chosen so
that all the intervals of the planned looks hold the truth together with probability
``level``. With ``K`` looks ``c`` is larger than the fixed-sample ``z`` (2.29 instead of 1.96
for three equally spaced looks at 95%); a gate may stop at any look whose interval clears its
limit, and the verdict keeps its error rate however early it stops.

``c`` is computed for the planned information fractions ``t_k = n_k / n_max``: the figures
estimated from nested seed sets behave like a Brownian motion in ``t`` (the standard
assumption of group-sequential designs, exact for means and asymptotic for the smooth
functionals here), so ``Z_k = W(t_k) / sqrt(t_k)`` and ``c`` solves
``P(max_k |Z_k| > c) = 1 - level``, by deterministic Monte Carlo (``DRAWS`` paths, a fixed seed,
then bisection). An interval built at the per-look level ``2 * Phi(c) - 1`` is that repeated
interval; :func:`look_level` returns it.
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np

DRAWS = 200_000  # Monte Carlo paths behind a boundary (its error is below 0.01 in c)


def look_sizes(chunk: int, maximum: int) -> list[int]:
    """The sample counts at which the looks happen: every ``chunk`` up to ``maximum`` (the last
    look at ``maximum`` itself)."""
    if chunk >= maximum:
        return [maximum]
    sizes = list(range(chunk, maximum, chunk))
    return sizes + [maximum]


def pocock_constant(fractions: list[float], level: float) -> float:
    """The constant ``c`` of Pocock's two-sided boundary at the information ``fractions`` (ascending,
    the last 1): ``P(max_k |W(t_k)| / sqrt(t_k) > c) = 1 - level`` for a Brownian motion ``W``."""
    z = NormalDist().inv_cdf(0.5 + level / 2)
    if len(fractions) == 1:
        return z
    t = np.asarray(fractions, dtype=np.float64)
    rng = np.random.default_rng(0x9C0C)
    steps = np.sqrt(np.diff(np.concatenate([[0.0], t])))
    paths = np.cumsum(rng.standard_normal((DRAWS, len(t))) * steps, axis=1)
    worst = np.abs(paths / np.sqrt(t)).max(axis=1)
    low, high = z, z + 3.0
    for _ in range(40):  # P(worst > c) falls as c grows: bisect to the level
        mid = (low + high) / 2
        if float((worst > mid).mean()) > 1 - level:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def look_level(sizes: list[int], level: float) -> float:
    """The per-look interval level that makes every look's interval a repeated confidence interval
    at ``level`` (equal to ``level`` for a single look)."""
    c = pocock_constant([s / sizes[-1] for s in sizes], level)
    return 2 * NormalDist().cdf(c) - 1


def describe(sizes: list[int], level: float) -> dict:
    """What a record says about the looks' boundary."""
    c = pocock_constant([s / sizes[-1] for s in sizes], level)
    return {
        "boundary": "pocock",
        "planned_looks": sizes,
        "level": level,
        "constant": round(c, 4),
        "look_level": 2 * NormalDist().cdf(c) - 1,
        "how": (
            f"repeated confidence intervals (Jennison and Turnbull) with Pocock's constant boundary: "
            f"every look's interval is the estimate +- {c:.3f} standard errors, so all "
            f"{len(sizes)} planned looks hold the truth together at {level:.0%}"
        ),
    }
