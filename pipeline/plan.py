"""``compress-deploy plan``: what each pruning ratio buys in measured latency, before pruning for real.

    compress-deploy plan CONFIG [key=value ...] [--backends onnxruntime,torch] [--batches 1,16]
                                [--what unet|sampler] [--repeat N] [--out DIR]

For every backend and batch size, every uniform-width ratio of the dense model is pruned
on a copy (structure only) and timed alternately with dense (see :mod:`deploy.latency`).
Writes ``plan.{json,md,png}`` to ``--out`` (default ``runs/<config name>/plan``): a table
and a chart of speed-up against MACs reduction with the MACs-proportional line, so the
cost of a latency target is visible before any finetuning.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from compressor.config import load_config
from compressor.errors import UserError
from compressor.pruning import uniform_ratios
from pipeline.context import RunContext, log, write_json

HEADER = (
    "| backend | batch | what | ratio | MACs kept | MACs reduction | dense ms | pruned ms | speed-up "
    "| speed-up / MACs reduction |"
)


def _list(text: str | None, cast, name: str) -> list | None:
    if text is None:
        return None
    try:
        values = [cast(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{name} {text!r}: expected a comma-separated list, e.g. {name} 1,16") from None
    if not values:
        raise UserError(f"{name}: empty list")
    return values


def table(rows: list[dict]) -> str:
    """The plan as a Markdown table."""
    lines = [HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
    for r in rows:
        red = 1 / r["macs_kept"]
        lines.append(
            f"| {r['backend']} | {r['batch']} | {r['what']} | {r['ratio']:.4g} | {r['macs_kept']:.3f} "
            f"| {red:.2f}x | {r['dense_ms']:.2f} | {r['median_ms']:.2f} | {r['speedup']:.2f}x "
            f"| {r['speedup'] / red:.2f} |"
        )
    return "\n".join(lines)


def chart(rows: list[dict], path: Path, title: str) -> None:
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


def main(argv: list[str]) -> int:
    """Measure, print the table, write plan.{json,md,png}."""
    parser = argparse.ArgumentParser(prog="compress-deploy plan", description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--backends", help="comma-separated (default: bench.backends available here)")
    parser.add_argument("--batches", help="comma-separated batch sizes (default: bench.batch_sizes)")
    parser.add_argument("--what", choices=["unet", "sampler"], default="unet")
    parser.add_argument("--repeat", type=int, default=None, help="timed calls per model per ratio")
    parser.add_argument("--out", type=Path, help="output folder (default runs/<config name>/plan)")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    from deploy.latency import backend_unavailable, time_ratios
    from deploy.runtimes import check_backend_name
    from pipeline.stages.prune import latency_probe

    backends = _list(args.backends, str, "--backends")
    if backends is None:
        backends = [b for b in cfg.bench.backends if not backend_unavailable(b)]
    for b in backends:
        check_backend_name(b)
        reason = backend_unavailable(b)
        if reason:
            raise UserError(f"--backends {b}: not measurable here ({reason})")
    batches = _list(args.batches, int, "--batches") or cfg.bench.batch_sizes
    if any(b < 1 for b in batches):
        raise UserError(f"--batches {args.batches}: batch sizes must be >= 1")
    repeat = args.repeat or cfg.prune.target_latency.repeat
    if repeat < 3:
        raise UserError(f"--repeat {repeat}: need at least 3 timed calls for a median")
    out = args.out or Path("runs") / cfg.name / "plan"
    ctx = RunContext(cfg, out)
    unet = ctx.dense.unet
    ratios = uniform_ratios(unet)
    rows: list[dict] = []
    for backend in backends:
        for batch in batches:
            lat = cfg.prune.target_latency
            probe = latency_probe(ctx, backend, batch, args.what, lat.warmup, repeat, cfg.bench.threads)
            log("plan", f"{probe.describe()}: ratios {', '.join(f'{r:g}' for r in ratios)}")

            def show(row: dict) -> None:
                log(
                    "plan",
                    f"ratio {row['ratio']:g}: {row['macs_kept']:.3f} of MACs, {row['speedup']:.2f}x "
                    f"({row['dense_ms']:.2f} -> {row['median_ms']:.2f} ms)",
                )

            for row in time_ratios(unet, ratios, probe, cfg.prune.round_to, ctx.image_shape(), on_trial=show):
                rows.append({"backend": backend, "batch": batch, "what": args.what, **row})
    out.mkdir(parents=True, exist_ok=True)
    text = table(rows)
    title = f"{cfg.model.name}: measured speed-up vs MACs reduction"
    write_json(out / "plan.json", {"config": cfg.name, "model": cfg.model.name, "rows": rows})
    (out / "plan.md").write_text(f"# Latency plan: {cfg.model.name}\n\n{text}\n\n![chart](plan.png)\n")
    chart(rows, out / "plan.png", title)
    print(text)
    print(f"wrote {out / 'plan.md'}, {out / 'plan.png'}, {out / 'plan.json'}")
    return 0
