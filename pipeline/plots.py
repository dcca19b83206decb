"""Plots shared by the report stage and the commands (plan, ablate): one place for each chart."""

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
