"""Writing a frontier for people: the Markdown table with intervals, the chart with error bars, and the
sentences that say what the brackets mean and how the stack was chosen."""

from __future__ import annotations

from pathlib import Path

from compressor.artifacts import write_json
from pipeline.frontier.choice import figure, point_interval


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
    """Speed-up (log) against Frechet distance, one colour per ratio, the Pareto front drawn and labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = frontier["points"]
    inf = frontier.get("ranked_by") == "fd_inf"
    fig, ax = plt.subplots(figsize=(9, 6))
    ratios = sorted({p["stack"]["ratio"] for p in points})
    cmap = plt.get_cmap("viridis", max(len(ratios), 2))
    for i, r in enumerate(ratios):
        mine = [p for p in points if p["stack"]["ratio"] == r]
        name = "dense" if r == 0 else f"pruned {r:g} ({mine[0]['macs_kept']:.2f} of MACs)"
        low = [figure(p) - point_interval(p)[0] for p in mine]
        high = [point_interval(p)[1] - figure(p) for p in mine]
        ax.errorbar([p["speedup"] for p in mine], [figure(p) for p in mine], yerr=[low, high], fmt="o",
                    color=cmap(i), label=name, alpha=0.7, capsize=2, elinewidth=0.8)  # fmt: skip
    front = sorted((p for p in points if p["pareto"]), key=lambda p: p["speedup"])
    ax.plot([p["speedup"] for p in front], [figure(p) for p in front], "k--", lw=1, label="Pareto front")
    for i, p in enumerate(front):  # labels alternate: left-above, right-below, so neighbours stay legible
        ax.scatter([p["speedup"]], [figure(p)], s=120, facecolors="none", edgecolors="red")
        offset, align = ((-8, 6), "right") if i % 2 == 0 else ((8, -10), "left")
        xy = (p["speedup"], figure(p))
        ax.annotate(p["label"], xy, fontsize=7, xytext=offset, textcoords="offset points", ha=align)
    if frontier.get("chosen"):
        c = frontier["chosen"]
        ax.scatter([c["speedup"]], [figure(c)], marker="*", s=250, color="red", label=f"chosen: {c['label']}")
    ax.axhline(figure(frontier["reference"]), color="grey", lw=0.8, ls=":", label="dense reference")
    ax.set_xscale("log")
    ax.set_yscale("symlog" if inf else "log")  # FD-infinity can be near zero or below it
    ref = frontier["reference"]["stack"]
    where = f"({frontier['backend']}, batch {frontier['batch']})"
    ax.set_xlabel(f"sampler speed-up vs dense {ref['scheduler']} {ref['steps']} {where}")
    level = frontier.get("interval", {}).get("level")
    bars = f"; bars: {level:.0%} intervals" if level else ""
    name = f"FD-infinity ({frontier['metric']})" if inf else frontier["metric"]
    ax.set_ylabel(f"{name} ({'symlog' if inf else 'log'}, lower is better{bars})")
    ax.set_title(f"{frontier['model']}: speed-quality frontier ({len(points)} stacks)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
    inf = c.get("fd_inf") is not None
    if inf:
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
