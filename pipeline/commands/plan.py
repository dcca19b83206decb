"""``compress-deploy plan``: what each pruning ratio buys in measured latency, before pruning for real.

    compress-deploy plan CONFIG [key=value ...] [--backends onnxruntime,torch] [--batches 1,16]
                                [--what unet|sampler] [--scheduler S] [--repeat N] [--out DIR]

For every backend and batch size, every uniform-width ratio of the dense model is pruned
on a copy (structure only) and timed alternately with dense (:func:`compressor.pruning.time_ratios`
with the timer of :mod:`deploy.latency`).
Writes ``plan.{json,md,png}`` to ``--out`` (default ``runs/<config name>/plan``): a table
and a chart of speed-up against MACs reduction with the MACs-proportional line, so the
cost of a latency target is visible before any finetuning.

``--target 3x|40ms [--levers prune,steps,scheduler,cache,precision]`` searches the measured
speed-quality frontier instead (finetuned ratios, solvers, steps, reuse, precision): the same
as ``compress-deploy frontier CONFIG --target ...`` (see :mod:`pipeline.commands.frontier_sweep`).
"""

from __future__ import annotations

from pathlib import Path

from compressor.config import LatencyTarget, SampleConfig, check_value, load_config
from compressor.errors import UserError
from compressor.pruning import time_ratios, uniform_ratios
from deploy.latency import backend_unavailable, latency_timer
from pipeline.commands.args import CommandParser, config_args, config_flag, int_list
from pipeline.commands.frontier_sweep import main as frontier_main
from pipeline.context import RunContext, StageCall, log, write_json
from pipeline.plots import plot_speedup_vs_macs
from rundir import layout

HEADER = (
    "| backend | batch | what | ratio | MACs kept | MACs reduction | dense ms | pruned ms | speed-up "
    "| speed-up / MACs reduction |"
)


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


def main(argv: list[str]) -> int:
    """Measure, print the table, write plan.{json,md,png}."""
    parser = CommandParser(prog="compress-deploy plan", description=__doc__.split("\n")[0])
    config_args(parser)
    parser.add_argument(
        "--backends", help="comma-separated backends to time (default: bench.backends measurable here)"
    )
    parser.add_argument("--batches", help="comma-separated batch sizes (default: bench.batch_sizes)")
    config_flag(parser, "--what", LatencyTarget, "what")
    config_flag(parser, "--repeat", LatencyTarget, "repeat", "prune.target_latency.repeat", default=None)
    config_flag(
        parser, "--scheduler", SampleConfig, "scheduler", help="solver of the timed sampler (--what sampler)"
    )
    parser.add_argument(
        "--out", type=Path, metavar="DIR", help="output folder (default: runs/<config name>/plan)"
    )
    parser.add_argument(
        "--target",
        help="search the frontier for this speed-up (3x) or latency (40ms) instead (default: none)",
    )
    parser.add_argument("--levers", help="levers the --target search may move (default: all)")
    args = parser.parse_intermixed_args(argv)
    if args.target:
        extra = ["--levers", args.levers] if args.levers else []
        extra += ["--out", str(args.out)] if args.out else []
        return frontier_main([args.config, *args.overrides, "--target", args.target, *extra])
    cfg = load_config(args.config, args.overrides)
    backends = _backends(args.backends, cfg.bench.backends)
    batches = int_list(args.batches, "--batches") or cfg.bench.batch_sizes
    out = args.out or layout.plan_dir(Path("runs") / cfg.name)
    ctx = RunContext(cfg, out).at_stage(StageCall("prune", "plan"))  # what the prune stage would prune
    unet = ctx.dense.unet
    ratios = uniform_ratios(unet)
    rows: list[dict] = []
    for backend in backends:
        for batch in batches:
            timer = latency_timer(
                cfg, ctx.device, ctx.dense.scheduler_config, ctx.image_shape(), backend=backend, batch=batch,
                what=args.what, repeat=args.repeat, threads=cfg.bench.threads, scheduler=args.scheduler,
                **ctx.timing_inputs(batch),
            )  # fmt: skip
            log("plan", f"{timer.describe()}: ratios {', '.join(f'{r:g}' for r in ratios)}")
            for row in time_ratios(unet, ratios, timer, cfg.prune.round_to, on_trial=_show):
                rows.append({"backend": backend, "batch": batch, "what": args.what, **row})
    out.mkdir(parents=True, exist_ok=True)
    text = table(rows)
    title = f"{cfg.model.name}: measured speed-up vs MACs reduction"
    write_json(out / "plan.json", {"config": cfg.name, "model": cfg.model.name, "rows": rows})
    (out / "plan.md").write_text(f"# Latency plan: {cfg.model.name}\n\n{text}\n\n![chart](plan.png)\n")
    plot_speedup_vs_macs(rows, out / "plan.png", title)
    print(text)
    print(f"wrote {out / 'plan.md'}, {out / 'plan.png'}, {out / 'plan.json'}")
    return 0


def _backends(text: str | None, default: list[str]) -> list[str]:
    """``--backends``, each checked by the config's rule and measurable here (default: bench's)."""
    if text is None:
        return [b for b in default if not backend_unavailable(b)]
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise UserError("--backends: empty list")
    for name in names:
        check_value("--backends", name, LatencyTarget, "backend")
        reason = backend_unavailable(name)
        if reason:
            raise UserError(f"--backends {name}: not measurable here ({reason})")
    return names


def _show(row: dict) -> None:
    log(
        "plan",
        f"ratio {row['ratio']:g}: {row['macs_kept']:.3f} of MACs, {row['speedup']:.2f}x "
        f"({row['dense_ms']:.2f} -> {row['median_ms']:.2f} ms)",
    )
