"""Writing a frontier for people: the Markdown table with intervals, the chart with error bars, and the
sentences that say what the brackets mean and how the stack was chosen."""

from __future__ import annotations

from pathlib import Path

from pipeline.frontier.choice import figure, point_interval
from pipeline.plots import plot_frontier
from rundir.artifacts import write_json


def with_ci(value: float, ci: list | None, digits: int) -> str:
    """A figure with its interval, e.g. ``15.7 [9.3, 22.2]`` (the figure alone where none was recorded)."""
    return f"{value:.{digits}f}" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def kid_text(value: float | None, ci: list | None) -> str:
    """KID x 1000 (the usual way it is printed) with its interval."""
    if value is None:
        return "-"
    return f"{1e3 * value:.2f}" + (f" [{1e3 * ci[0]:.2f}, {1e3 * ci[1]:.2f}]" if ci else "")


def table(frontier: dict) -> str:
    """The frontier as a Markdown table, fastest first, Pareto points in bold, every quality figure
    with its interval; "within noise of" lists the Pareto rows whose Frechet interval overlaps."""
    metric = frontier["metric"]
    inf = frontier.get("ranked_by") == "fd_inf"
    lines = [
        f"| # | stack | MACs kept | ms (batch {frontier['batch']}) | speed-up | "
        + ("FD-infinity | FD-infinity - dense | " if inf else "")
        + f"{metric} | {metric} ratio | KID x 1e3 | SSIM | Pareto | within noise of |",
        "|---|---|---|---|---|" + ("---|---|" if inf else "") + "---|---|---|---|---|---|",
    ]
    order = sorted(frontier["points"], key=lambda p: -p["speedup"])
    row = {p["key"]: i + 1 for i, p in enumerate(order)}
    for i, p in enumerate(order, 1):
        mark = "**yes**" if p["pareto"] else ""
        label = f"**{p['label']}**" if p["pareto"] else p["label"]
        ties = sorted(row[k] for k in p.get("within_noise", []) if k in row and order[row[k] - 1]["pareto"])
        lines.append(
            f"| {i} | {label} | {p['macs_kept']:.2f} | {p['latency_ms']:.1f} | {p['speedup']:.2f}x "
            + (
                f"| {with_ci(p['fd_inf'], p.get('fd_inf_ci'), 1)} "
                f"| {with_ci(p['fd_inf_diff'], p.get('fd_inf_diff_ci'), 1)} "
                if inf
                else ""
            )  # fmt: skip
            + f"| {with_ci(p['fd'], p.get('fd_ci'), 1)} | {with_ci(p['fd_ratio'], p.get('fd_ratio_ci'), 2)} "
            f"| {kid_text(p.get('kid'), p.get('kid_ci'))} | {with_ci(p['ssim'], p.get('ssim_ci'), 3)} "
            f"| {mark} "
            f"| {', '.join(map(str, ties))} |"
        )
    return "\n".join(lines)


def plot(frontier: dict, path: Path) -> Path:
    """The frontier's chart (:func:`pipeline.plots.plot_frontier`), each point at its ranking figure."""
    placed = [{**p, "y": figure(p), "ci": point_interval(p)} for p in frontier["points"]]
    chosen = frontier.get("chosen")
    chosen_y = figure(chosen) if chosen else None
    return plot_frontier(frontier, placed, chosen_y, figure(frontier["reference"]), path)


def noise_note(frontier: dict) -> str:
    """What the brackets of a frontier's table mean."""
    interval = frontier.get("interval", {})
    level = interval.get("level")
    if not level:
        return "none recorded (measured before intervals)"
    how = "paired jackknife" if interval.get("method", "jackknife") == "jackknife" else "paired bootstrap"
    rule = ("the paired interval of their Frechet difference holds zero" if interval.get("within_noise")
            else "their Frechet intervals overlap")  # fmt: skip
    return (
        f"{level:.0%} intervals, {how} over the seeds; two points are within noise of each other when {rule}"
    )


def choice_text(c: dict, target: str, metric: str) -> str:
    """One sentence: the chosen stack, and how the within-noise rule chose it."""
    if c.get("fd_inf") is not None:  # ranked by FD-infinity
        metric = "FD-infinity"
    text = (f"Chosen for {target}: **{c['label']}** ({c['speedup']:.2f}x, {metric} "
            f"{with_ci(figure(c), point_interval(c), 2)}, "
            f"SSIM {c.get('ssim', float('nan')):.3f}).")  # fmt: skip
    choice = c.get("choice")
    if choice:
        n = len(choice["within_noise_of_best"])
        best = choice["best"]
        if choice["moved_from_best"]:
            text += (
                f" The lowest {metric} meeting the target is {best['label']} "
                f"({best.get('figure', best['fd']):.2f}, "
                f"{best['speedup']:.2f}x); {n} stacks are within noise of it and this is the fastest."
            )
        else:
            text += f" It has the lowest {metric} of the {choice['meeting_target']} stacks meeting the target"
            text += (
                f" and is the fastest of the {n} within noise of it." if n > 1 else "; none is within noise."
            )
    gate = (choice or {}).get("quality_gate")
    if gate:
        passing, limit = gate["meeting_target_and_passing"], gate["max_fd_increase"]
        text += (
            f" Considered: the {passing} stacks meeting the target whose FD-infinity increase over dense "
            f"passes acceptance.max_fd_increase {limit:g}."
            if passing
            else f" No stack meeting the target passes acceptance.max_fd_increase {limit:g}; all were "
            "considered."
        )
    return text


def write(frontier: dict, out: Path) -> None:
    """``frontier.json``, ``frontier.md`` and ``frontier.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "frontier.json", frontier)
    plot(frontier, out / "frontier.png")
    chosen = ""
    if frontier.get("chosen"):
        chosen = f"\n{choice_text(frontier['chosen'], frontier['target'], frontier['metric'])}\n"
    ref = frontier["reference"]
    text = (
        f"# Speed-quality frontier: {frontier['model']}\n\n"
        f"Latency: whole sampler, {frontier['backend']}, batch {frontier['batch']}, speed-up vs dense "
        f"{ref['stack']['scheduler']} {ref['stack']['steps']} timed alternately; quality: "
        f"{frontier['samples']} images per stack, {frontier['metric']} (dense reference "
        f"{with_ci(ref['fd'], ref.get('fd_ci'), 2)}"
        + (
            f"; FD-infinity {with_ci(ref['fd_inf'], ref.get('fd_inf_ci'), 2)}, which ranks the stacks"
            if frontier.get("ranked_by") == "fd_inf"
            else ""
        )  # fmt: skip
        + "), SSIM vs the dense reference's images from the same "
        f"seeds; brackets: {noise_note(frontier)}.\n{chosen}\n"
        f"{table(frontier)}\n\n![frontier](frontier.png)\n"
    )
    (out / "frontier.md").write_text(text)
