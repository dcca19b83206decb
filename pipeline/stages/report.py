"""The ``report`` stage: one Markdown and one self-contained HTML file a person reads.

Long because it writes one section per stage record (prune, latency search, finetune,
quality with intervals, parity, bench, acceptance, frontier), each a short function, and a
reader finds every section of the report in one file.
"""

from __future__ import annotations

import base64
import html
import shutil
from pathlib import Path

from compressor import runlayout
from compressor.records import (
    BenchMetrics,
    FinetuneMetrics,
    ParityMetrics,
    PruneMetrics,
    QualityMetrics,
    read_metrics,
)
from pipeline.acceptance import Check, evaluate
from pipeline.acceptance import verdict as acceptance_verdict
from pipeline.context import RunContext, StageResult, log
from pipeline.frontier.tables import choice_text, noise_note
from pipeline.plots import plot_speedup_vs_macs, plot_taylor_diagnostics

SECTIONS = ["model", "prune", "finetune", "acceptance"]
INPUTS = ["prune", "finetune", "distill_steps", "samples", "quality", "parity", "bench", "check"]


class Doc:
    """Sections rendered twice: Markdown (images as files) and HTML (images inlined)."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.blocks: list[tuple[str, object]] = []

    def heading(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def para(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: list[str], rows: list[list[object]]) -> None:
        self.blocks.append(("table", (header, [[_fmt(c) for c in r] for r in rows])))

    def image(self, path: Path, alt: str) -> None:
        self.blocks.append(("img", (path, alt)))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, value in self.blocks:
            if kind == "h2":
                out += [f"## {value}", ""]
            elif kind == "p":
                out += [str(value), ""]
            elif kind == "table":
                header, rows = value
                out.append("| " + " | ".join(header) + " |")
                out.append("|" + "---|" * len(header))
                out += ["| " + " | ".join(r) + " |" for r in rows]
                out.append("")
            elif kind == "img":
                path, alt = value
                out += [f"![{alt}]({path.name})", ""]
        return "\n".join(out)

    def html(self) -> str:
        parts = [
            "<!doctype html><html><head><meta charset='utf-8'>",
            f"<title>{html.escape(self.title)}</title>",
            "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
            "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:4px 8px;"
            "text-align:right}td:first-child{text-align:left}th{background:#eee}.PASS{color:#080;font-weight:bold}"
            ".FAIL{color:#b00;font-weight:bold}img{max-width:100%;border:1px solid #ddd}</style>",
            f"</head><body><h1>{html.escape(self.title)}</h1>",
        ]
        for kind, value in self.blocks:
            if kind == "h2":
                parts.append(f"<h2>{html.escape(str(value))}</h2>")
            elif kind == "p":
                parts.append(f"<p>{_inline(str(value))}</p>")
            elif kind == "table":
                header, rows = value
                parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
                for r in rows:
                    cells = "".join(
                        f"<td class='{c if c in ('PASS', 'FAIL') else ''}'>{html.escape(c)}</td>" for c in r
                    )
                    parts.append(f"<tr>{cells}</tr>")
                parts.append("</table>")
            elif kind == "img":
                path, alt = value
                data = base64.b64encode(path.read_bytes()).decode()
                parts.append(f"<p><img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'></p>")
        parts.append("</body></html>")
        return "\n".join(parts)


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def _inline(text: str) -> str:
    out = html.escape(text)
    while "**" in out:
        out = out.replace("**", "<b>", 1).replace("**", "</b>", 1)
    return out


def _plot_losses(losses: list, path: Path, terms: list | None = None) -> bool:
    """The loss curve; with distillation, its task, output and feature terms beside the total."""
    if not losses:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _plot_latency(rows: list[dict], path: Path) -> bool:
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["backend"], r["what"], r["batch"]) for r in rows})
    labels = [f"{b}\n{w} x{n}" for b, w, n in keys]
    val = {(r["backend"], r["what"], r["batch"], r["model"]): r["median_ms"] for r in rows}
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(keys)), 3.5))
    xs = range(len(keys))
    for offset, model, color in ((-0.2, "dense", "#888"), (0.2, "pruned", "#2a7")):
        ax.bar(
            [x + offset for x in xs], [val.get((*k, model), 0) for k in keys], 0.4, label=model, color=color
        )
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("median latency (ms)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("latency, dense vs pruned")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def run(ctx: RunContext) -> StageResult:
    """Write ``RUN/report/report.md`` and ``RUN/report/report.html`` from the run's records."""
    out = ctx.stage_dir("report")
    stages = ("prune", "finetune", "distill_steps", "quality", "parity", "bench")
    metrics = {s: read_metrics(ctx.run_dir, s) for s in stages}
    checks = evaluate(
        ctx.cfg.acceptance,
        metrics["bench"],
        metrics["parity"],
        metrics["quality"],
        ctx.cfg.prune.target_latency,
    )
    verdict = acceptance_verdict(checks).upper()
    doc = Doc(f"compress-deploy report: {ctx.cfg.name}")
    verdict_section(doc, checks, verdict)
    settings_section(doc, ctx)
    if metrics["prune"]:
        prune_section(doc, metrics["prune"], out)
    if metrics["finetune"]:
        finetune_section(doc, metrics["finetune"], out)
    if metrics["distill_steps"]:
        student_section(doc, metrics["distill_steps"], metrics["bench"])
    if metrics["quality"]:
        quality_section(doc, metrics["quality"])
    if ctx.record("samples"):
        samples_section(doc, ctx, out)
    if metrics["parity"]:
        parity_section(doc, metrics["parity"])
    if metrics["bench"]:
        bench_section(doc, metrics["bench"], out)
    frontier_section(doc, ctx, metrics["bench"], out)
    acceptance_section(doc, checks)
    files = write_report(doc, out)
    return StageResult({"verdict": verdict, "checks": len(checks)}, files)


def write_report(doc: Doc, out: Path) -> list[Path]:
    """``report.md`` and ``report.html`` (atomically), plus the plots they show."""
    md, page = out / "report.md", out / "report.html"
    for path, text in ((md, doc.markdown()), (page, doc.html())):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    log("report", f"wrote {md} and {page}")
    plots = [value[0] for kind, value in doc.blocks if kind == "img"]
    return [md, page] + [p for p in dict.fromkeys(plots) if p.is_file()]


def verdict_section(doc: Doc, checks: list[Check], verdict: str) -> None:
    """The acceptance verdict, first thing on the page."""
    unsure = [c.name for c in checks if c.outcome == "inconclusive"]
    note = f"; inconclusive: {', '.join(unsure)} (an interval straddles its limit)" if unsure else ""
    doc.para(
        f"**Acceptance: {verdict}** ({sum(c.passed for c in checks)}/{len(checks)} checks passed{note})"
        if checks
        else "**Acceptance: no limits configured**"
    )


def _ci(value: object, interval: list | None) -> str:
    """A figure with its interval, e.g. ``0.963 [0.85, 1.09]``."""
    if not isinstance(value, float):
        return _fmt(value)
    return f"{value:.4g}" + (f" [{interval[0]:.4g}, {interval[1]:.4g}]" if interval else "")


def settings_section(doc: Doc, ctx: RunContext) -> None:
    """What was done: model, data, pruning criterion and target, finetune recipe."""
    cfg = ctx.cfg
    p, lat = cfg.prune, cfg.prune.target_latency
    target = ", ".join(
        f"{k}={getattr(p, k)}" for k in ("ratio", "target_macs", "target_params") if getattr(p, k) is not None
    )
    doc.heading("What was done")
    doc.table(
        ["setting", "value"],
        [
            ["model", f"{cfg.model.name} ({cfg.model.init})"],
            ["data", cfg.data.source],
            [
                "pruning",
                f"{p.method}, threshold {p.threshold}, stride {p.timestep_stride}, "
                f"Taylor batch {p.batch_size}, score {p.taylor_score}, "
                f"GroupNorm channels {p.group_selection}",
            ],
            ["target", target or f"latency: {lat.goal()} on {lat.backend} ({lat.what}, batch {lat.batch})"],
            [
                "finetune",
                f"{cfg.finetune.steps} steps, batch {cfg.finetune.batch_size}, lr {cfg.finetune.lr}, "
                f"EMA {cfg.finetune.ema_decay}",
            ],
            ["run directory", str(ctx.run_dir)],
        ],
    )


def prune_section(doc: Doc, m: PruneMetrics, out: Path) -> None:
    """Size before and after, the Taylor timesteps, the latency search and the diagnostic."""
    doc.heading("Size")
    doc.table(
        ["", "dense", "pruned", "kept"],
        [
            ["params", f"{m.params_before / 1e6:.3f}M", f"{m.params_after / 1e6:.3f}M", m.params_kept],
            ["MACs", f"{m.macs_before / 1e9:.4f}G", f"{m.macs_after / 1e9:.4f}G", m.macs_kept],
        ],
    )
    ts = m.timesteps_used
    doc.para(
        f"Pruning ratio {m.ratio:.4g}. Taylor timesteps kept: {len(ts)} ({ts[0]}..{ts[-1]})."
        if ts
        else f"Pruning ratio {m.ratio:.4g}; {m.method} needs no Taylor pass."
    )
    if m.trials and m.target_latency:
        latency_search_section(doc, m, out)
    if m.diagnostics:
        plot_taylor_diagnostics([("", m.diagnostics)], {m.threshold: ts[-1]}, out / "taylor.png")
        doc.para(
            "Per-timestep diagnostic of the Taylor pass: each timestep's loss against the largest, "
            "the norm of its gradient, and how well the gradients of two halves of the Taylor batch "
            "agree (cosine near 1: signal; near 0: noise)."
        )
        doc.image(out / "taylor.png", "Taylor pass diagnostic")


def latency_search_section(doc: Doc, m: PruneMetrics, out: Path) -> None:
    """The latency search: target, every trial, the chosen structure and the chart."""
    lat = m.target_latency
    doc.heading("Latency search")
    milder = lat.get("next_milder")
    goal = f"{lat['speedup']:g}x over dense" if lat["speedup"] is not None else f"at most {lat['ms']:g} ms"
    chosen = (
        "levels " + ", ".join(f"{k}: {v:g}" for k, v in m.level_ratios.items())
        if m.level_ratios
        else f"ratio {m.ratio:.4g}"
    )
    doc.para(
        f"Target: {goal} on {lat['probe']}, noise margin {lat['margin']:.0%}. Chosen: {chosen}, measured "
        f"{lat['chosen']['speedup']:.2f}x ({lat['chosen']['median_ms']:.2f} ms, dense "
        f"{lat['chosen']['dense_ms']:.2f} ms)"
        + (
            f"; the next milder trial (ratio {milder['ratio']:.4g}) measured {milder['speedup']:.2f}x"
            if milder
            else ""
        )
        + f". Search time {lat['search_seconds']:.0f} s; each trial timed alternately with dense."
    )
    if lat.get("search") == "latency":
        doc.para(
            "Hardware-aware allocation: each resolution level was timed alone at each ratio (the table "
            f"below{' came from the cache' if lat.get('table_cached') else ' was measured for this run'}); "
            "allocations predicted to meet the target were ranked by the importance they keep and the "
            "best were measured for real. Importance kept by the uniform ratios, for comparison: "
            + ", ".join(f"ratio {u['ratio']:g}: {u['importance_kept']:.3f}" for u in lat["uniform_reference"])
            + "."
        )
        doc.table(
            ["level", "ratio", "dense ms", "pruned ms", "saving"],
            [
                [r["level"], r["ratio"], r["dense_ms"], r["median_ms"], f"{r['saving']:.1%}"]
                for r in lat["table"]
            ],
        )
    doc.table(
        ["ratio", "per level", "MACs kept", "params", "dense ms", "pruned ms", "speed-up", "meets"],
        [
            [
                t["ratio"],
                ", ".join(f"{k}: {v:g}" for k, v in t["levels"].items()) if t.get("levels") else "uniform",
                t["macs_kept"],
                f"{t['params'] / 1e6:.3f}M",
                t["dense_ms"],
                t["median_ms"],
                f"{t['speedup']:.2f}x",
                "yes" if t.get("meets") else "no",
            ]
            for t in m.trials
        ],
    )
    rows = [{**t, "backend": lat["backend"], "batch": lat["batch"], "what": lat["what"]} for t in m.trials]
    plot_speedup_vs_macs(
        rows, out / "latency_search.png", "latency search: measured speed-up vs MACs reduction"
    )
    doc.image(out / "latency_search.png", "latency search trials")


def finetune_section(doc: Doc, m: FinetuneMetrics, out: Path) -> None:
    """Final and evaluation losses, and the loss curve."""
    doc.heading("Finetuning")
    doc.para(
        f"Final training loss {_fmt(m.final_loss)}; evaluation loss EMA {_fmt(m.eval_loss_ema)} "
        f"vs raw {_fmt(m.eval_loss_raw)}."
    )
    if m.loss_terms:
        step, task, output, features = m.loss_terms[-1]
        doc.para(
            f"Distilled from the dense model; at step {step:g}: task loss {_fmt(task)}, output "
            f"distillation {_fmt(output)}, feature distillation {_fmt(features)} (unweighted)."
        )
    if _plot_losses(m.losses, out / "loss.png", m.loss_terms):
        doc.image(out / "loss.png", "finetune loss curve")


def student_section(doc: Doc, m, bench: BenchMetrics | None) -> None:
    """The few-step student: its rounds (steps, final loss, distance from the first teacher, cost) and
    its sampler against the dense reference sampler."""
    doc.heading("Few-step student")
    doc.para(
        f"Progressive distillation of {m.student} from the dense model's DDIM {m.start_steps} steps down to "
        f"{m.target_steps} ({m.prediction_type} prediction): {len(m.rounds)} rounds, "
        f"{m.optimizer_steps} optimizer steps, {m.wall_s:.0f} s. The student is the run's final model."
    )
    doc.table(
        ["round", "steps", "final loss", f"MSE vs teacher images ({m.eval_images})", "seconds", "resumed"],
        [[i + 1, r["steps"], r.get("final_loss"), r.get("mse_vs_teacher"), r.get("wall_s"),
          r.get("resumed_from")] for i, r in enumerate(m.rounds)],
    )  # fmt: skip
    if bench is not None and bench.student:
        doc.table(
            ["backend", "batch", "student ms", "dense reference", "dense ms", "speed-up"],
            [[r["backend"], r["batch"], r["ms"], r["reference"], r["reference_ms"], f"{r['speedup']:.2f}x"]
             for r in bench.student],
        )  # fmt: skip


def quality_section(doc: Doc, m: QualityMetrics) -> None:
    """Every model's SSIM/PSNR vs dense, Frechet distance, its ratio to dense and KID, with intervals."""
    doc.heading("Quality")
    metric = m.frechet_metric
    doc.table(
        ["model", "SSIM vs dense", "PSNR vs dense (dB)", metric, f"{metric} / dense", "KID"],
        [
            [k, _ci(v.get("ssim_vs_dense"), v.get("ssim_vs_dense_ci")), v.get("psnr_vs_dense"),
             _ci(v.get(metric), v.get(f"{metric}_ci")), _ci(v.get("fd_ratio"), v.get("fd_ratio_ci")),
             _ci(v.get("kid"), v.get("kid_ci"))]
            for k, v in m.models.items()
        ],
    )  # fmt: skip
    level = m.interval.get("level")
    how = (
        f"a paired delete-a-group jackknife over the seeds ({m.interval.get('resamples')} groups)"
        if m.interval.get("method", "bootstrap") == "jackknife"
        else f"a paired bootstrap over the seeds ({m.interval.get('resamples')} resamples)"
    )
    intervals = (
        f" Brackets: {level:.0%} intervals from {how}: what another draw of as many seeds would likely give."
        if level
        else ""
    )
    doc.para(
        f"{m.num_samples} samples per model, {m.scheduler.upper()} {m.steps} steps, same seeds; "
        f"{m.num_reference} reference images.{intervals}" + (f" {m.frechet_note}" if m.frechet_note else "")
    )


def samples_section(doc: Doc, ctx: RunContext, out: Path) -> None:
    """The dense-vs-compressed sample grid."""
    grid = runlayout.samples_grid(ctx.run_dir)
    if grid.is_file():
        shutil.copyfile(grid, out / "grid.png")
        doc.heading("Samples (same seeds)")
        doc.image(out / "grid.png", "dense vs pruned samples")


def parity_section(doc: Doc, m: ParityMetrics) -> None:
    """ONNX Runtime (and TensorRT) vs PyTorch, per file."""
    doc.heading("Parity (ONNX Runtime vs PyTorch)")
    header = [
        "model",
        "graph",
        "precision",
        "provider",
        "max abs",
        "median abs",
        "min cosine",
        "sampler PSNR",
    ]
    keys = ["precision", "provider", "max_abs_error", "median_abs_error", "min_cosine", "sampler_psnr_db"]
    doc.table(
        [*header, "verdict"],
        [
            [r["model"], r.get("part", "UNet call"), *[r[k] for k in keys], "PASS" if r["passed"] else "FAIL"]
            for r in m.results
        ],
    )


def bench_section(doc: Doc, m: BenchMetrics, out: Path) -> None:
    """Latency rows, speed-ups, skipped backends, host facts and the bar chart."""
    doc.heading("Latency")
    doc.table(
        ["backend", "what", "batch", "model", "median ms", "p95 ms"],
        [[r["backend"], r["what"], r["batch"], r["model"], r["median_ms"], r["p95_ms"]] for r in m.results],
    )
    keys = ["backend", "what", "batch", "speedup", "macs_reduction", "speedup_over_macs_reduction"]
    doc.table(
        ["backend", "what", "batch", "speed-up", "MACs reduction", "speed-up / MACs reduction"],
        [[s[k] for k in keys] for s in m.speedup],
    )
    for name, why in m.skipped.items():
        doc.para(f"{name}: skipped ({why})")
    doc.para("Host: " + ", ".join(f"{k} {v}" for k, v in m.host.items()))
    if _plot_latency(m.results, out / "latency.png"):
        doc.image(out / "latency.png", "latency bar chart")


def frontier_section(doc: Doc, ctx: RunContext, bench: BenchMetrics | None, out: Path) -> None:
    """The speed-quality frontier of ``RUN/frontier`` (``compress-deploy frontier`` or a latency target
    over levers): what was measured, the Pareto points, the chosen stack and its chart."""
    import json

    folder = runlayout.frontier_dir(ctx.run_dir)
    path = folder / "frontier.json"
    if not path.is_file():
        return
    try:
        f = json.loads(path.read_text())
        points, ref = f["points"], f["reference"]
    except (OSError, ValueError, KeyError):
        doc.heading("Speed-quality frontier")
        doc.para(f"{path} is unreadable; rerun `compress-deploy frontier` to rewrite it.")
        return
    doc.heading("Speed-quality frontier")
    ratios = ", ".join(f"{r:g}" for r in sorted({p["stack"]["ratio"] for p in points}))
    doc.para(
        f"{len(points)} stacks over pruning ratios {ratios}: whole-sampler latency "
        f"on {f['backend']} at batch {f['batch']}, speed-up against dense {ref['stack']['scheduler']} "
        f"{ref['stack']['steps']} timed alternately; {f['metric']} and SSIM from {f['samples']} images per "
        f"stack (dense reference {_ci(ref['fd'], ref.get('fd_ci'))}); brackets: {noise_note(f)}. "
        "Pareto-optimal stacks:"
    )
    metric = f["metric"]
    front = sorted((p for p in points if p["pareto"]), key=lambda p: -p["speedup"])
    doc.table(
        ["stack", "MACs kept", "ms", "speed-up", metric, f"{metric} / dense", "SSIM"],
        [
            [p["label"], p["macs_kept"], p["latency_ms"], p["speedup"], _ci(p["fd"], p.get("fd_ci")),
             _ci(p["fd_ratio"], p.get("fd_ratio_ci")), _ci(p["ssim"], p.get("ssim_ci"))]
            for p in front
        ],
    )  # fmt: skip
    pruned = [p for p in front if p["stack"]["ratio"] > 0]
    doc.para(
        f"{len(pruned)} of the {len(front)} Pareto-optimal stacks are pruned"
        + (f" (from {min(p['speedup'] for p in pruned):.2f}x up)." if pruned else ".")
    )
    chosen = f.get("chosen")
    if chosen:
        verified = ""
        if bench is not None and bench.stack:
            verified = f" Bench measured it at {bench.stack['speedup']:.2f}x."
        levers = f" (levers {', '.join(f.get('levers', []))})"
        doc.para(choice_text(chosen, f"{f.get('target')}{levers}", metric) + verified)
    if (folder / "frontier.png").is_file():
        shutil.copyfile(folder / "frontier.png", out / "frontier.png")
        doc.image(out / "frontier.png", "speed-quality frontier")


def acceptance_section(doc: Doc, checks: list[Check]) -> None:
    """Every acceptance check with its measured figure, limit and verdict."""
    doc.heading("Acceptance checks")
    if not checks:
        doc.para("No limits are configured in the acceptance section.")
        return
    doc.table(
        ["check", "measured [interval]", "limit", "verdict"],
        [
            [c.name, _ci(c.measured, c.interval), f"{c.direction} {c.limit:g}", c.outcome.upper()]
            for c in checks
        ],
    )
    unsure = [c for c in checks if c.outcome == "inconclusive"]
    if unsure:
        doc.para(" ".join(c.line() for c in unsure))
