"""Plots shared by the report stage and the ablation summary."""

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
