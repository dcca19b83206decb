"""The Pareto rule and the choice: which points no other beats, which are within noise of each other,
and the stack a latency target chooses.

Quality is ranked by FD-infinity (the Frechet distance free of its 1/N bias, which differs from
model to model, docs/quality.md) where every point has it, else by the finite-N Frechet distance
(frontiers measured before FD-infinity): :func:`figure` and :func:`point_interval`.

Two stacks are *within noise* of each other when the paired interval of their Frechet difference
holds zero: every stack samples the same seeds, so one replicate (a group of seeds left out) is
applied to both and the difference's interval is far tighter than the overlap of two intervals
(two 95% intervals can overlap while the difference is clear). Points without replicates fall
back to the overlap of their intervals.
"""

from __future__ import annotations

from compressor.stack import Stack
from pipeline.frontier.grid import Grid


def ranking_key(points: list[dict]) -> str:
    """The Frechet figure the points are ranked by: ``fd_inf`` when every point has it, else ``fd``."""
    return "fd_inf" if points and all(p.get("fd_inf") is not None for p in points) else "fd"


def figure(point: dict) -> float:
    """A point's Frechet figure: FD-infinity when recorded, else the finite-N distance."""
    return point["fd_inf"] if point.get("fd_inf") is not None else point["fd"]


def pareto(points: list[dict]) -> list[bool]:
    """Which points no other point beats: at least as fast and as good, and better in one."""
    key = ranking_key(points)
    flags = []
    for p in points:
        dominated = any(
            q is not p
            and q["speedup"] >= p["speedup"]
            and q[key] <= p[key]
            and (q["speedup"] > p["speedup"] or q[key] < p[key])
            for q in points
        )
        flags.append(not dominated)
    return flags


QUALITY_KEYS = ("fd", "fd_ci", "fd_ratio", "fd_ratio_ci", "ssim", "ssim_ci", "kid", "kid_std", "kid_ci")
ADHERENCE_KEYS = (
    "adherence",
    "adherence_ci",
    "adherence_ratio",
    "adherence_ratio_ci",
    "adherence_ratio_note",
)
FD_INF_KEYS = ("fd_inf", "fd_inf_ci", "fd_inf_diff", "fd_inf_diff_ci", "fd_inf_ratio", "fd_inf_ratio_ci")


def point_interval(point: dict) -> list[float]:
    """A point's interval of :func:`figure` (the bare figure where none was recorded)."""
    if point.get("fd_inf") is not None:
        return point.get("fd_inf_ci") or [point["fd_inf"], point["fd_inf"]]
    return point.get("fd_ci") or [point["fd"], point["fd"]]


def mark_noise(points: list[dict], replicates: dict | None = None, boot=None) -> None:
    """``within_noise``: the keys of the other points within noise of this one. With ``replicates``
    (key -> the Frechet replicates of a point's seeds) and ``boot`` (their Resampling): the paired
    interval of the difference holds zero; otherwise the two Frechet intervals overlap."""
    # lazy: pulls in torch, which importing pipeline.frontier.choice alone does not
    from compressor.intervals import overlap

    def tied(p: dict, q: dict) -> bool:
        if replicates is not None and p["key"] in replicates and q["key"] in replicates:
            low, high = boot.interval(figure(p) - figure(q), replicates[p["key"]] - replicates[q["key"]])
            return low <= 0 <= high
        return overlap(point_interval(p), point_interval(q))

    for p in points:
        p["within_noise"] = [q["key"] for q in points if q is not p and tied(p, q)]


def passes_increase(point: dict, max_increase: float) -> bool:
    """Whether a point's FD-infinity increase over the dense reference is decided below
    ``max_increase`` (its whole paired interval at or under it: the run's gate would pass)."""
    ci = point.get("fd_inf_diff_ci")
    return ci is not None and ci[1] <= max_increase


def passes_adherence(point: dict, min_ratio: float) -> bool:
    """Whether a point's prompt adherence ratio to dense is decided at or over ``min_ratio`` (the lower
    end of its paired interval: the run's ``acceptance.min_adherence_ratio`` gate would pass)."""
    ci = point.get("adherence_ratio_ci")
    return ci is not None and ci[0] >= min_ratio


def choose(points: list[dict], speedup: float | None = None, ms: float | None = None,
           margin: float = 0.0, grid: Grid | None = None,
           max_increase: float | None = None,
           min_adherence_ratio: float | None = None) -> dict | None:  # fmt: skip
    """Among the points meeting the target (with ``margin``) within ``grid``: the fastest of those within
    noise of the best (lowest Frechet distance) such point: listed in its ``within_noise`` (see
    :func:`mark_noise`), or, for points without that list, whose Frechet interval overlaps the best's.

    A point whose quality cannot be told from the best one's at this sample count is as good, so
    the faster wins. With ``max_increase`` (the run's ``acceptance.max_fd_increase``) only points
    whose increase over the dense reference passes it are considered, when any meeting the target
    does (otherwise all are, and the choice says none passes); with ``min_adherence_ratio`` (the run's
    ``acceptance.min_adherence_ratio``, points with prompt adherence) likewise those whose adherence
    ratio's interval is at or over it, both gates together. The returned point carries
    ``choice``: the rule, the best point, the stacks within noise of it, whether the rule moved the
    choice away from the best, and the quality gate it respected.
    """
    # lazy: pulls in torch, which importing pipeline.frontier.choice alone does not
    from compressor.intervals import overlap

    allowed = set(grid.stacks()) if grid else None

    def met(p: dict) -> bool:
        if speedup is not None:
            return p["speedup"] >= speedup * (1 + margin)
        return p["latency_ms"] <= ms * (1 - margin)  # type: ignore[operator]

    meets = [p for p in points if (allowed is None or Stack(**p["stack"]) in allowed) and met(p)]
    if not meets:
        return None
    gate = None
    adherent = min_adherence_ratio is not None and any("adherence_ratio" in p for p in meets)
    if max_increase is not None or adherent:
        passing = [
            p for p in meets
            if (max_increase is None or passes_increase(p, max_increase))
            and (not adherent or passes_adherence(p, min_adherence_ratio))  # type: ignore[arg-type]
        ]  # fmt: skip
        gate = {"max_fd_increase": max_increase, "meeting_target_and_passing": len(passing)}
        if adherent:
            gate["min_adherence_ratio"] = min_adherence_ratio
        meets = passing or meets
    best = min(meets, key=lambda p: (figure(p), -p["speedup"]))
    paired = "within_noise" in best

    def within(p: dict) -> bool:
        if paired:
            return best["key"] in p.get("within_noise", [])
        return overlap(point_interval(p), point_interval(best))

    tied = [p for p in meets if p is best or within(p)]
    chosen = max(tied, key=lambda p: (p["speedup"], -figure(p)))
    choice = {
        "rule": "fastest stack meeting the target whose Frechet distance is within noise of the best such "
        + (
            "stack's (the paired interval of their difference holds zero)"
            if paired
            else "stack's (their intervals overlap)"
        ),
        "meeting_target": len(meets),
        "best": {k: best[k] for k in ("key", "label", "speedup", "fd", "fd_inf") if k in best}
        | {"fd_ci": best.get("fd_ci"), "figure": figure(best), "figure_ci": point_interval(best)},
        "within_noise_of_best": [p["key"] for p in tied],
        "moved_from_best": chosen is not best,
    }
    if gate is not None:
        choice["quality_gate"] = gate
    return {**chosen, "choice": choice}
