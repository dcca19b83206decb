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
    batches = frontier.get("batches")  # several timed batches (a conditional run: always)
    adherent = "conditioning" in frontier
    speed = (
        " | ".join(f"ms (batch {b}) | speed-up (batch {b})" for b in sorted(batches))
        if batches
        else f"ms (batch {frontier['batch']}) | speed-up"
    )
    lines = [
        f"| # | stack | MACs kept | {speed} | "
        + ("FD-infinity | FD-infinity - dense | " if inf else "")
        + f"{metric} | {metric} ratio | KID x 1e3 | SSIM | "
        + ("adherence | adherence ratio | " if adherent else "")
        + "Pareto | within noise of |",
        "|---|---|---|" + "---|---|" * len(batches or [0]) + ("---|---|" if inf else "") + "---|---|---|---|"
        + ("---|---|" if adherent else "") + "---|---|",
    ]  # fmt: skip
    order = sorted(frontier["points"], key=lambda p: -p["speedup"])
    row = {p["key"]: i + 1 for i, p in enumerate(order)}
    for i, p in enumerate(order, 1):
        mark = "**yes**" if p["pareto"] else ""
        label = f"**{p['label']}**" if p["pareto"] else p["label"]
        ties = sorted(row[k] for k in p.get("within_noise", []) if k in row and order[row[k] - 1]["pareto"])
        timed = (
            " | ".join(speed_cells(p, b) for b in sorted(batches))
            if batches
            else f"{p['latency_ms']:.1f} | {p['speedup']:.2f}x"
        )
        lines.append(
            f"| {i} | {label} | {p['macs_kept']:.2f} | {timed} "
            + (
                f"| {with_ci(p['fd_inf'], p.get('fd_inf_ci'), 1)} "
                f"| {with_ci(p['fd_inf_diff'], p.get('fd_inf_diff_ci'), 1)} "
                if inf
                else ""
            )  # fmt: skip
            + f"| {with_ci(p['fd'], p.get('fd_ci'), 1)} | {with_ci(p['fd_ratio'], p.get('fd_ratio_ci'), 2)} "
            f"| {kid_text(p.get('kid'), p.get('kid_ci'))} | {with_ci(p['ssim'], p.get('ssim_ci'), 3)} "
            + (f"| {adherence_text(p)} " if adherent else "")
            + f"| {mark} "
            f"| {', '.join(map(str, ties))} |"
        )
    return "\n".join(lines)


def speed_cells(point: dict, batch: int) -> str:
    """A point's milliseconds and speed-up at ``batch`` (two table cells; ``-`` where not timed)."""
    t = point.get("by_batch", {}).get(str(batch))
    return f"{t['latency_ms']:.1f} | {t['speedup']:.2f}x" if t else "- | -"


def adherence_text(point: dict) -> str:
    """A point's prompt adherence and its paired ratio to dense, each with its interval (two cells)."""
    value = point.get("adherence")
    if value is None:
        return "- | -"
    ratio = point.get("adherence_ratio")
    shown = with_ci(ratio, point.get("adherence_ratio_ci"), 3) if ratio is not None else "-"
    return f"{with_ci(value, point.get('adherence_ci'), 3)} | {shown}"


def plot(frontier: dict, path: Path) -> Path:
    """The frontier's chart (:func:`pipeline.plots.plot_frontier`), each point at its ranking figure."""
    placed = [{**p, "y": figure(p), "ci": point_interval(p)} for p in frontier["points"]]
    chosen = frontier.get("chosen")
    if chosen:  # --target: the stack the run goes with
        marks = [(f"chosen: {chosen['label']}", chosen["speedup"], figure(chosen))]
    else:  # frontier.targets: each target's choice, where one was found
        found = [(t, c) for t, c in (frontier.get("choices") or {}).items() if c]
        marks = [(f"{t}: {c['label']}", c["speedup"], figure(c)) for t, c in found]
    return plot_frontier(frontier, placed, marks, figure(frontier["reference"]), path)


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
            f"SSIM {c.get('ssim', float('nan')):.3f}"
            + (f", adherence ratio {adherence_text(c).split(' | ')[1]}" if c.get("adherence") else "")
            + ").")  # fmt: skip
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
        whose, names = [], []
        if limit is not None:
            whose.append(f"whose FD-infinity increase over dense passes acceptance.max_fd_increase {limit:g}")
            names.append(f"acceptance.max_fd_increase {limit:g}")
        if gate.get("min_adherence_ratio") is not None:
            least = gate["min_adherence_ratio"]
            whose.append(
                f"whose adherence ratio's interval is at or over acceptance.min_adherence_ratio {least:g}"
            )
            names.append(f"acceptance.min_adherence_ratio {least:g}")
        text += (
            f" Considered: the {passing} stacks meeting the target {' and '.join(whose)}."
            if passing
            else f" No stack meeting the target passes {' and '.join(names)}; all were considered."
        )
    return text


def choices_text(frontier: dict) -> list[str]:
    """One sentence per latency target of ``frontier['choices']``: its choice, or that no measured
    stack reaches it (and the fastest that was measured)."""
    out = []
    for target, chosen in frontier.get("choices", {}).items():
        if chosen is not None:
            out.append(choice_text(chosen, target, frontier["metric"]))
            continue
        fastest = max(frontier["points"], key=lambda p: p["speedup"])
        out.append(
            f"Chosen for {target}: none: no measured stack reaches it (the fastest, {fastest['label']}, "
            f"is {fastest['speedup']:.2f}x)."
        )
    return out


def write(frontier: dict, out: Path) -> None:
    """``frontier.json``, ``frontier.md`` and ``frontier.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "frontier.json", frontier)
    plot(frontier, out / "frontier.png")
    chosen = ""
    if frontier.get("chosen"):
        chosen = f"\n{choice_text(frontier['chosen'], frontier['target'], frontier['metric'])}\n"
    if frontier.get("choices"):
        chosen += "".join(f"\n- {line}" for line in choices_text(frontier)) + "\n"
    ref = frontier["reference"]
    what = f"whole sampler, {frontier['backend']}, batch {frontier['batch']}"
    if frontier.get("batches"):
        shown = ", ".join(map(str, sorted(frontier["batches"])))
        what = (f"whole sampler, {frontier['backend']}, batches {shown} "
                f"(speed-ups and targets read batch {frontier['batch']})")  # fmt: skip
    if "conditioning" in frontier:
        what = (
            f"the whole {'text-to-image ' if frontier['conditioning'] == 'text' else ''}call "
            f"({frontier['whole_call']}, guidance scale {frontier['guidance_scale']:g}; few-step students "
            "unguided), " + what.removeprefix("whole sampler, ")
        )
        if ref.get("adherence") is not None:
            what += (
                f"; prompt adherence ({frontier['adherence_metric']}: dense "
                f"{with_ci(ref['adherence'], ref.get('adherence_ci'), 3)}) and its paired ratio to dense, "
                "the same seeds and prompts"
            )
        elif frontier.get("adherence_note"):
            what += f"; prompt adherence: {frontier['adherence_note']}"
    text = (
        f"# Speed-quality frontier: {frontier['model']}\n\n"
        f"Latency: {what}, speed-up vs dense "
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
