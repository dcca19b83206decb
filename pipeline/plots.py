"""Every chart of the project: the report stage's, the commands' (plan, ablate, frontier) and the
distillation sweep's. One place for each chart; callers hand in plain figures."""

from __future__ import annotations

from pathlib import Path


def plot_taylor_diagnostics(series: list[tuple[str, list[dict]]], cuts: dict[float, int], path: Path) -> None:
    """L_t/L_max, the gradient norm and the half-batch gradient cosine against t.

    ``series``: (label, diagnostic rows of one Taylor pass) pairs; ``cuts``: threshold
    -> last timestep it kept, drawn as dotted lines.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, rows in series:
        ts = [r["t"] for r in rows]
        for ax, key in zip(axes, ("loss_ratio", "grad_norm", "half_cosine"), strict=True):
            ax.plot(ts, [r[key] for r in rows], lw=1, label=label)
    titles = ("L_t / L_max", "norm of dL_t/dw (log)", "cosine of the two half-batch gradients")
    for ax, title in zip(axes, titles, strict=True):
        for thr, t in sorted(cuts.items()):
            if thr and t is not None:
                ax.axvline(t, color="grey", ls=":", lw=1)
                ax.text(t, ax.get_ylim()[1], f" T={thr:g}", fontsize=7, rotation=90, va="top")
        ax.set_xlabel("timestep t")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    if len(series) > 1:
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_speedup_vs_macs(rows: list[dict], path: Path, title: str) -> None:
    """Speed-up vs MACs reduction per (backend, batch), with the MACs-proportional line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    top = 1.0
    for key in dict.fromkeys((r["backend"], r["batch"], r["what"]) for r in rows):
        pts = [r for r in rows if (r["backend"], r["batch"], r["what"]) == key]
        xs = [1.0] + [1 / r["macs_kept"] for r in pts]
        ys = [1.0] + [r["speedup"] for r in pts]
        top = max(top, *xs, *ys)
        ax.plot(xs, ys, marker="o", label=f"{key[0]}, batch {key[1]} ({key[2]})")
    ax.plot([1, top], [1, top], "k--", linewidth=1, label="proportional to MACs")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
    ax.set_xlabel("MACs reduction (dense / pruned)")
    ax.set_ylabel("measured speed-up (dense ms / pruned ms)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


OUTCOME_COLOURS = {"pass": "#1a7f37", "fail": "#c62828", "inconclusive": "#b7791f", None: "#555555"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int = 100, layout: bool = True) -> Path:
    if layout:
        fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
    return path


def plot_losses(losses: list, path: Path, terms: list | None = None) -> bool:
    """The finetune's loss curve; with distillation, its task, output and feature terms beside the
    total (log scale). False (nothing written) when there are no losses."""
    if not losses:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot([s for s, _ in losses], [v for _, v in losses], label="total (weighted)")
    for i, name in enumerate(("task", "output distillation", "feature distillation"), start=1):
        values = [row[i] for row in terms or []]
        if any(values):
            ax.plot([row[0] for row in terms], values, label=name, alpha=0.8)
    if terms:
        ax.legend(fontsize=7)
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("finetune loss")
    ax.grid(alpha=0.3)
    _save(fig, path)
    return True


def plot_headline(figures: list, path: Path) -> Path:
    """One strip per headline figure (a :class:`pipeline.summary.Figure`): the measured point in its
    outcome's colour, its interval as a bar, the limit as a dashed line with the failing side shaded."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(figures), 1, figsize=(7.2, 0.95 * len(figures) + 0.2), squeeze=False)
    for ax, f in zip(axes[:, 0], figures, strict=True):
        colour = OUTCOME_COLOURS.get(f.outcome, OUTCOME_COLOURS[None])
        span = [v for v in (f.value, f.limit, *(f.interval or [])) if v is not None]
        if f.unit == "x":
            span.append(1.0)  # dense: no speed-up
        low, high = (min(span), max(span)) if span else (0.0, 1.0)
        pad = (high - low) * 0.15 or abs(high) * 0.1 or 1.0
        ax.set_xlim(low - pad, high + pad)
        if f.limit is not None:
            bad = (f.limit, high + pad) if f.direction == "<=" else (low - pad, f.limit)
            ax.axvspan(*bad, color=OUTCOME_COLOURS["fail"], alpha=0.08, lw=0)
            ax.axvline(f.limit, color="#222", ls="--", lw=1.2)
            where = ("data", "axes fraction")
            ax.annotate(f"limit {f.direction} {f.limit:g}{f.unit}", (f.limit, 1.0), xycoords=where,
                        xytext=(3, -2), textcoords="offset points", fontsize=8, va="top")  # fmt: skip
        if f.unit == "x":
            ax.axvline(1.0, color="#999", lw=0.8, ls=":")
        if f.interval:
            ax.plot(f.interval, [0, 0], color=colour, lw=7, alpha=0.35, solid_capstyle="butt")
            ax.plot(f.interval, [0, 0], "|", color=colour, ms=14, mew=2)
        if f.value is not None:
            ax.plot([f.value], [0], "o", color=colour, ms=10, mec="white", mew=1.5, zorder=3)
        ax.set_ylim(-1, 1)
        ax.set_yticks([])
        for side in ("left", "right", "top"):
            ax.spines[side].set_visible(False)
        ax.tick_params(axis="x", labelsize=8)
        undecidable = "  (no interval: undecidable)" if f.outcome == "inconclusive" and not f.interval else ""
        ax.set_title(f"{f.label}: {f.shown()}{undecidable}", loc="left", fontsize=9, fontweight="bold")
        if f.outcome:
            ax.set_title(f.outcome.upper(), loc="right", fontsize=9, fontweight="bold", color=colour)
    return _save(fig, path, dpi=110)


def plot_latency_bars(rows: list[dict], names: dict[str, str], path: Path) -> bool:
    """Median latency of dense and compressed, one panel per (UNet call or sampler, batch), bars per
    backend on a linear scale from zero with the value printed on each bar and the speed-up above
    each pair. ``rows``: the bench record's results; ``names``: record model -> shown name."""
    if not rows:
        return False
    plt = _pyplot()
    whats = [w for w in ("unet", "sampler") if any(r["what"] == w for r in rows)]
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(len(whats), len(batches), figsize=(5.2 * len(batches), 3.4 * len(whats)),
                             squeeze=False)  # fmt: skip
    colours = {"dense": "#8c8c8c", "pruned": "#2a7fbf"}
    for (i, what), (j, batch) in ((a, b) for a in enumerate(whats) for b in enumerate(batches)):
        ax = axes[i][j]
        mine = [r for r in rows if (r["what"], r["batch"]) == (what, batch)]
        groups = list(dict.fromkeys((r["backend"], r.get("variant")) for r in mine))
        ms = {(r["backend"], r.get("variant"), r["model"]): r["median_ms"] for r in mine}
        top = max([r["median_ms"] for r in mine], default=1.0)
        for k, (backend, variant) in enumerate(groups):
            for offset, model in ((-0.2, "dense"), (0.2, "pruned")):
                value = ms.get((backend, variant, model))
                if value is None:
                    continue
                label = names.get(model, model) if k == 0 else None
                ax.bar(k + offset, value, 0.4, color=colours[model], label=label)
                ax.text(k + offset, value, f"{value:.3g}", ha="center", va="bottom", fontsize=7)
            dense, comp = ms.get((backend, variant, "dense")), ms.get((backend, variant, "pruned"))
            if dense and comp:
                ax.text(k, top * 1.12, f"{dense / comp:.2f}x", ha="center", fontsize=9, fontweight="bold")
        labels = [b if not v or len({g[1] for g in groups}) == 1 else f"{b}\n{v}" for b, v in groups]
        ax.set_xticks(range(len(groups)), labels, fontsize=8)
        ax.set_ylim(0, top * 1.25)
        ax.set_ylabel("median ms per call" if what == "unet" else "median ms per sampler run", fontsize=8)
        steps = next((r.get("steps") for r in mine if r.get("steps")), None)
        title = "one UNet call" if what == "unet" else f"whole sampler{f' ({steps} steps)' if steps else ''}"
        ax.set_title(f"{title}, batch {batch}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(axis="y", labelsize=8)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="upper center", ncol=2, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    _save(fig, path, layout=False)
    return True


def plot_speed_quality(points: list[dict], path: Path, x_label: str, y_label: str,
                       x_limit: float | None = None, y_limit: float | None = None) -> Path:  # fmt: skip
    """Sampler speed-up against a Frechet figure with its interval. ``points``: dicts with ``label``,
    ``x``, ``y``, ``ci`` ([low, high] or None), ``kind`` (``run``: dense and compressed, drawn large
    and labelled; ``frontier``: the frontier's stacks, small, with ``pareto``). ``x_limit`` /
    ``y_limit``: the gates' limits, drawn as dashed lines with the region meeting both shaded."""
    import matplotlib.ticker

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    frontier = [p for p in points if p["kind"] == "frontier"]
    for p in frontier:
        err = [[p["y"] - p["ci"][0]], [p["ci"][1] - p["y"]]] if p.get("ci") else None
        ax.errorbar([p["x"]], [p["y"]], yerr=err, fmt="o", ms=4, color="#9aa5b1", elinewidth=0.7, alpha=0.8,
                    zorder=1)  # fmt: skip
    front = sorted((p for p in frontier if p.get("pareto")), key=lambda p: p["x"])
    if front:
        ax.plot([p["x"] for p in front], [p["y"] for p in front], "--", color="#9aa5b1", lw=1,
                label=f"frontier: {len(frontier)} stacks, Pareto front dashed")  # fmt: skip
    colours = {"dense": "#555555"}
    for p in (p for p in points if p["kind"] == "run"):
        colour = colours.get(p["label"], "#2a7fbf")
        err = [[p["y"] - p["ci"][0]], [p["ci"][1] - p["y"]]] if p.get("ci") else None
        ax.errorbar([p["x"]], [p["y"]], yerr=err, fmt="o", ms=9, color=colour, capsize=4, elinewidth=1.5,
                    zorder=3, label=p["label"])  # fmt: skip
        ax.annotate(f"{p['label']}\n{p['x']:.2f}x, {p['y']:.3g}", (p["x"], p["y"]), xytext=(10, 0),
                    textcoords="offset points", fontsize=8, va="center")  # fmt: skip
    xs = [p["x"] for p in points] + ([x_limit] if x_limit else [])
    if max(xs) / min(xs) > 4:  # a frontier reaching far: the run's points stay apart on a log axis
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
    ax.set_xlim(min(0.9, min(xs) * 0.9), max(xs) * 1.25)
    if x_limit is not None:
        ax.axvline(x_limit, color="#222", ls="--", lw=1, label=f"speed-up limit {x_limit:g}x")
    if y_limit is not None:
        ax.axhline(y_limit, color="#222", ls=":", lw=1, label=f"Frechet limit {y_limit:.3g}")
    if x_limit is not None or y_limit is not None:  # the region meeting both limits
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        left = x_limit if x_limit is not None else x0
        top = y_limit if y_limit is not None else y1
        ax.fill_between([left, x1], y0, top, color=OUTCOME_COLOURS["pass"], alpha=0.07, lw=0)
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
    ax.set_xlabel(x_label, fontsize=9)
    ax.set_ylabel(y_label, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path, dpi=110)


def plot_seed_pairs(dense, compressed, names: tuple[str, str], path: Path, per_row: int = 4) -> Path:
    """Dense and compressed samples of the same seeds, each pair side by side. ``dense`` and
    ``compressed``: (N, C, H, W) tensors in [0, 1], index i drawn from seed i of both models."""
    import torch

    plt = _pyplot()
    n = len(dense)
    rows = -(-n // per_row)
    fig, axes = plt.subplots(rows, per_row, figsize=(2.3 * per_row, 1.45 * rows + 0.2), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        a, b = dense[k].clamp(0, 1), compressed[k].clamp(0, 1)
        gap = a.new_ones(a.shape[0], a.shape[1], max(1, a.shape[2] // 16))
        pair = torch.cat([a, gap, b], dim=2)
        image = pair.permute(1, 2, 0).numpy()
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1,
                  interpolation="nearest")  # fmt: skip
        ax.set_title(f"seed {k}: {names[0]} | {names[1]}", fontsize=8)
    return _save(fig, path, dpi=110)


def plot_prompt_pairs(prompts: list[str], rows: dict[str, object], path: Path) -> Path:
    """Each prompt on a row, one image per model beside each other (same seed): ``rows`` maps a
    model's label to (N, C, H, W) in [0, 1], image i drawn for ``prompts[i]``."""
    plt = _pyplot()
    names = list(rows)
    fig, axes = plt.subplots(
        len(prompts), len(names), figsize=(1.6 * len(names) + 2.6, 1.5 * len(prompts) + 0.3), squeeze=False
    )
    for i, prompt in enumerate(prompts):
        for j, name in enumerate(names):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            image = rows[name][i].clamp(0, 1).permute(1, 2, 0).numpy()  # type: ignore[index]
            ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")  # fmt: skip
            if i == 0:
                ax.set_title(name, fontsize=9)
            if j == 0:
                ax.set_ylabel(prompt if len(prompt) <= 40 else prompt[:37] + "...", fontsize=8,
                              rotation=0, ha="right", va="center")  # fmt: skip
    return _save(fig, path, dpi=110)


def plot_ablation(rows: list[dict], path: Path) -> None:
    """The ablation: Frechet distance after pruning and after finetuning, and SSIM, with the spread
    over seeds (``compress-deploy ablate``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, title, log_scale in (
        (axes[0], "fd_after_pruning", "right after pruning", True),
        (axes[1], "fd_after_finetune", "after finetuning", False),
        (axes[2], "ssim_after_finetune", "SSIM vs dense after finetuning", False),
    ):
        means = [r[f"{key}_mean"] or 0 for r in rows]
        stds = [r[f"{key}_std"] or 0 for r in rows]
        ax.bar(range(len(rows)), means, yerr=stds, color="#2a7", capsize=3)
        ax.set_xticks(range(len(rows)), names, rotation=40, ha="right", fontsize=8)
        ax.set_title(title if key.startswith("ssim") else f"{rows[0]['frechet_metric']} {title}")
        if log_scale:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_distill_sweep(rows: list[dict], path: Path, metric: str, modes: list[str]) -> None:
    """The distillation sweep: Frechet distance vs finetune steps, one line per (ratio, mode), error
    bars over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = sorted({r["ratio"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(ratios), figsize=(5 * len(ratios), 3.5), squeeze=False)
    for ax, ratio in zip(axes[0], ratios, strict=True):
        for mode in modes:
            mine = [r for r in rows if r["ratio"] == ratio and r["mode"] == mode]
            if mine:
                ax.errorbar([r["budget"] for r in mine], [r["fd_mean"] for r in mine],
                            yerr=[r["fd_std"] for r in mine], marker="o", capsize=3, label=mode)  # fmt: skip
        ax.set_xscale("log")
        ax.set_title(f"{ratio:g} of dense MACs")
        ax.set_xlabel("finetune steps")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_frontier(
    frontier: dict, points: list[dict], chosen: list[tuple[str, float, float]], reference_y: float, path: Path
) -> Path:
    """The frontier: speed-up (log) against the ranking Frechet figure, one colour per ratio, the Pareto
    front drawn and labelled. ``points``: the frontier's points, each with its figure ``y`` and
    interval ``ci`` (:func:`pipeline.frontier.tables.plot` places them); ``chosen``: the stacks chosen
    (legend text, speed-up, figure), each starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inf = frontier.get("ranked_by") == "fd_inf"
    fig, ax = plt.subplots(figsize=(9, 6))
    ratios = sorted({p["stack"]["ratio"] for p in points})
    cmap = plt.get_cmap("viridis", max(len(ratios), 2))
    for i, r in enumerate(ratios):
        mine = [p for p in points if p["stack"]["ratio"] == r]
        name = "dense" if r == 0 else f"pruned {r:g} ({mine[0]['macs_kept']:.2f} of MACs)"
        low = [p["y"] - p["ci"][0] for p in mine]
        high = [p["ci"][1] - p["y"] for p in mine]
        ax.errorbar([p["speedup"] for p in mine], [p["y"] for p in mine], yerr=[low, high], fmt="o",
                    color=cmap(i), label=name, alpha=0.7, capsize=2, elinewidth=0.8)  # fmt: skip
    front = sorted((p for p in points if p["pareto"]), key=lambda p: p["speedup"])
    ax.plot([p["speedup"] for p in front], [p["y"] for p in front], "k--", lw=1, label="Pareto front")
    for i, p in enumerate(front):  # labels alternate: left-above, right-below, so neighbours stay legible
        ax.scatter([p["speedup"]], [p["y"]], s=120, facecolors="none", edgecolors="red")
        offset, align = ((-8, 6), "right") if i % 2 == 0 else ((8, -10), "left")
        xy = (p["speedup"], p["y"])
        ax.annotate(p["label"], xy, fontsize=7, xytext=offset, textcoords="offset points", ha=align)
    for (text, speedup, y), color in zip(chosen, ("red", "darkorange", "magenta", "brown"), strict=False):
        ax.scatter([speedup], [y], marker="*", s=250, color=color, label=text)
    ax.axhline(reference_y, color="grey", lw=0.8, ls=":", label="dense reference")
    ax.set_xscale("log")
    ax.set_yscale("symlog" if inf else "log")  # FD-infinity can be near zero or below it
    ref = frontier["reference"]["stack"]
    where = f"({frontier['backend']}, batch {frontier['batch']})"
    what = "whole-call" if "conditioning" in frontier else "sampler"  # a conditional model's whole call
    ax.set_xlabel(f"{what} speed-up vs dense {ref['scheduler']} {ref['steps']} {where}")
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
