"""The Pareto rule and the choice: which points no other beats, which are within noise of each other
(overlapping Frechet intervals), and the stack a latency target chooses."""

from __future__ import annotations

from pipeline.frontier.grid import Grid, Stack


def pareto(points: list[dict]) -> list[bool]:
    """Which points no other point beats: at least as fast and as good, and better in one."""
    flags = []
    for p in points:
        dominated = any(
            q is not p
            and q["speedup"] >= p["speedup"]
            and q["fd"] <= p["fd"]
            and (q["speedup"] > p["speedup"] or q["fd"] < p["fd"])
            for q in points
        )
        flags.append(not dominated)
    return flags


QUALITY_KEYS = ("fd", "fd_ci", "fd_ratio", "fd_ratio_ci", "ssim", "ssim_ci", "kid", "kid_std", "kid_ci")


def point_interval(point: dict) -> list[float]:
    """A point's Frechet interval (a bare figure where none was recorded)."""
    return point.get("fd_ci") or [point["fd"], point["fd"]]


def mark_noise(points: list[dict]) -> None:
    """``within_noise``: the keys of the other points whose Frechet interval overlaps this one's."""
    from compressor.intervals import overlap

    for p in points:
        p["within_noise"] = [
            q["key"] for q in points if q is not p and overlap(point_interval(p), point_interval(q))
        ]


def choose(points: list[dict], speedup: float | None = None, ms: float | None = None,
           margin: float = 0.0, grid: Grid | None = None) -> dict | None:  # fmt: skip
    """Among the points meeting the target (with ``margin``) within ``grid``: the fastest of those whose
    Frechet interval overlaps that of the best (lowest Frechet distance) such point.

    A point whose quality cannot be told from the best one's at this sample count is as good, so
    the faster wins. The returned point carries ``choice``: the rule, the best point, the stacks
    within noise of it, and whether the rule moved the choice away from the best.
    """
    from compressor.intervals import overlap

    allowed = set(grid.stacks()) if grid else None

    def met(p: dict) -> bool:
        if speedup is not None:
            return p["speedup"] >= speedup * (1 + margin)
        return p["latency_ms"] <= ms * (1 - margin)  # type: ignore[operator]

    meets = [p for p in points if (allowed is None or Stack(**p["stack"]) in allowed) and met(p)]
    if not meets:
        return None
    best = min(meets, key=lambda p: (p["fd"], -p["speedup"]))
    tied = [p for p in meets if p is best or overlap(point_interval(p), point_interval(best))]
    chosen = max(tied, key=lambda p: (p["speedup"], -p["fd"]))
    choice = {
        "rule": "fastest stack meeting the target whose Frechet interval overlaps the best such stack's",
        "meeting_target": len(meets),
        "best": {k: best[k] for k in ("key", "label", "speedup", "fd") if k in best}
        | {"fd_ci": point_interval(best)},
        "within_noise_of_best": [p["key"] for p in tied],
        "moved_from_best": chosen is not best,
    }
    return {**chosen, "choice": choice}
