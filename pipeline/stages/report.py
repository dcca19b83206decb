"""The ``report`` stage: one Markdown and one self-contained HTML file a person reads.

At the top, the run at a glance: the summary card (verdict in its colour, the headline speed-up
and quality figures against their limits, what to do next), dense and compressed samples of the
same seeds in pairs, and the speed-quality chart. Below, one short section per stage record
(settings, size, latency search, finetune, student, quality with intervals, parity, latency,
frontier, acceptance: :mod:`pipeline.report_sections`). One name per model throughout: dense,
pruned (not finetuned), finetuned, student. The renderer is :mod:`pipeline.report_render`, the
charts :mod:`pipeline.plots`.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.context import RunContext, StageResult, log
from pipeline.plots import plot_headline, plot_seed_pairs, plot_speed_quality
from pipeline.report_render import Doc
from pipeline.report_sections import (
    acceptance_section,
    bench_section,
    finetune_section,
    frontier_section,
    parity_section,
    prune_section,
    quality_section,
    samples_section,
    settings_section,
    student_section,
)
from pipeline.summary import MODEL_NAMES, Summary, build_summary
from rundir import layout
from rundir.records import BenchMetrics, QualityMetrics, read_metrics

SECTIONS = ["model", "prune", "finetune", "acceptance"]
INPUTS = ["prune", "finetune", "distill_steps", "samples", "quality", "parity", "bench", "check"]
PAIRS = 8  # seeds shown as dense | compressed pairs


def run(ctx: RunContext) -> StageResult:
    """Write ``RUN/report/report.md`` and ``RUN/report/report.html`` from the run's records."""
    out = ctx.stage_dir("report")
    stages = ("prune", "finetune", "distill_steps", "quality", "parity", "bench")
    metrics = {s: read_metrics(ctx.run_dir, s) for s in stages}
    config = Path("configs") / f"{ctx.cfg.name}.yaml"
    summary = build_summary(ctx.run_dir, ctx.cfg, str(config) if config.is_file() else "CONFIG")
    names = model_names(summary, metrics["bench"])
    frontier = read_frontier(ctx.run_dir)
    doc = Doc(f"compress-deploy report: {ctx.cfg.name}")
    summary_section(doc, summary, steps_note(ctx, metrics["quality"], metrics["bench"], summary), out)
    pairs_section(doc, ctx.run_dir, metrics["quality"], out)
    speed_quality_section(doc, summary, metrics["quality"], frontier, out)
    settings_section(doc, ctx)
    if metrics["prune"]:
        prune_section(doc, metrics["prune"], summary.final, out)
    if metrics["finetune"]:
        finetune_section(doc, metrics["finetune"], out)
    if metrics["distill_steps"]:
        student_section(doc, metrics["distill_steps"], metrics["bench"])
    if metrics["quality"]:
        quality_section(doc, metrics["quality"])
    if metrics["parity"]:
        parity_section(doc, metrics["parity"], names)
    if metrics["bench"]:
        bench_section(doc, metrics["bench"], names, out)
    frontier_section(doc, ctx, frontier, metrics["bench"], out)
    acceptance_section(doc, summary.checks)
    if ctx.record("samples"):
        samples_section(doc, ctx, out)
    files = write_report(doc, out)
    return StageResult({"verdict": summary.verdict.upper(), "checks": len(summary.checks)}, files)


def write_report(doc: Doc, out: Path) -> list[Path]:
    """``report.md`` and ``report.html`` (atomically), plus the plots they show."""
    md, page = out / "report.md", out / "report.html"
    for path, text in ((md, doc.markdown()), (page, doc.html())):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    log("report", f"wrote {md} and {page}")
    return [md, page] + [p for p in doc.images() if p.is_file()]


def model_names(summary: Summary, bench: BenchMetrics | None) -> dict[str, str]:
    """The bench and parity records' model keys -> the one name each model has in the report:
    their ``pruned`` rows timed the run's final model (finetuned, or the student, ...)."""
    source = bench.compressed_from if bench is not None else None
    return {"dense": "dense", "pruned": MODEL_NAMES.get(source or "", summary.final)}


def read_frontier(run: Path) -> dict | str | None:
    """``RUN/frontier/frontier.json`` as written by the frontier; None when absent, a sentence when
    unreadable."""
    path = layout.frontier_dir(run) / "frontier.json"
    if not path.is_file():
        return None
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        found = None
    if not isinstance(found, dict) or not {"points", "reference"} <= set(found):
        return f"{path} is unreadable; rerun `compress-deploy frontier` to rewrite it."
    return found


# -- the run at a glance ------------------------------------------------------------------------


def summary_section(doc: Doc, summary: Summary, note: str, out: Path) -> None:
    """The summary card, first thing on the page."""
    figures = [f for f in summary.headline() if f.value is not None]
    chart = plot_headline(figures, out / "headline.png") if figures else None
    doc.card(summary, chart, [note] if note else [])


def steps_note(
    ctx: RunContext, quality: QualityMetrics | None, bench: BenchMetrics | None, s: Summary
) -> str:
    """Why quality and speed are measured at the step counts they are (from the run's config)."""
    cfg = ctx.cfg
    if quality is None and bench is None:
        return ""
    q_steps = quality.steps if quality else cfg.quality.steps or cfg.sample.steps
    source = (
        "quality.steps" if cfg.quality.steps else f"quality.steps unset: sample.steps = {cfg.sample.steps}"
    )
    text = (
        f"Why these step counts: quality is scored at {cfg.sample.scheduler.upper()} {q_steps} steps "
        f"({source}), the sampler a user deploys, because image quality changes with the step count. "
    )
    if s.sampler and s.sampler.what.startswith(("student", "stack")):
        return text + (
            f"Speed is timed for the {s.final}'s own sampler ({s.sampler.what}), since its fewer steps are "
            "part of the speed-up."
        )
    timed = bench.sampler_steps if bench and bench.sampler_steps else cfg.bench.sampler_steps
    return text + (
        f"Speed is timed at {timed} steps (bench.sampler_steps): dense and {s.final} take the same steps, "
        "so the sampler's speed-up is the ratio of their time per step and hardly depends on how many "
        "there are; fewer steps keep the bench short."
    )


def pairs_section(doc: Doc, run: Path, quality: QualityMetrics | None, out: Path) -> None:
    """Dense and final-model samples of the same seeds, each pair side by side (from the quality
    stage's samples; nothing when that stage did not run)."""
    path = layout.quality_samples(run)
    label = quality.compressed_label() if quality else None
    if quality is None or label is None or not path.is_file():
        return
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        if not {"dense", label} <= set(f.keys()):
            return
        dense, compressed = f.get_slice("dense")[:PAIRS], f.get_slice(label)[:PAIRS]
    name = label if label in MODEL_NAMES.values() else "compressed"
    plot_seed_pairs(dense, compressed, ("dense", name), out / "pairs.png")
    steps = f"both {quality.scheduler.upper()} {quality.steps} steps"
    if quality.student_steps:
        steps = f"the student at its {quality.student_steps} steps, dense at {quality.steps}"
    doc.heading("Dense and compressed, same seeds")
    doc.para(
        f"The first {len(dense)} of the quality stage's {quality.num_samples} seeds: in each pair, dense "
        f"on the left and {name} on the right, from the same starting noise ({steps}), so what differs "
        "is what compression changed."
    )
    doc.image(out / "pairs.png", f"dense | {name} samples, same seeds")


def speed_quality_section(doc: Doc, summary: Summary, quality: QualityMetrics | None,
                          frontier: dict | str | None, out: Path) -> None:  # fmt: skip
    """Sampler speed-up against the Frechet figure: dense and the final model at the run's sampler,
    and the frontier's stacks when ``RUN/frontier`` holds one."""
    label = quality.compressed_label() if quality else None
    if quality is None or label is None or summary.sampler is None:
        return
    stacks = frontier["points"] if isinstance(frontier, dict) else []
    inf = quality.figure("dense", "fd_inf")[0] is not None
    inf = inf and all(p.get("fd_inf") is not None for p in stacks)
    key, name = ("fd_inf", "FD-infinity") if inf else (quality.frechet_metric, quality.frechet_metric)
    (dense_y, dense_ci), (y, ci) = quality.figure("dense", key), quality.figure(label, key)
    if dense_y is None or y is None:
        return
    points = [
        {"label": "dense", "x": 1.0, "y": dense_y, "ci": dense_ci, "kind": "run"},
        {"label": summary.final, "x": summary.sampler.speedup, "y": y, "ci": ci, "kind": "run"},
    ]
    y_key = "fd_inf" if inf else "fd"
    points += [{"label": p["label"], "x": p["speedup"], "y": p[y_key], "ci": p.get(f"{y_key}_ci"),
                "kind": "frontier", "pareto": p.get("pareto")} for p in stacks]  # fmt: skip
    limits = {c.name: c.limit for c in summary.checks}
    y_limit = None
    if "max_fd_increase" in limits and inf:
        y_limit = dense_y + limits["max_fd_increase"]
    elif "max_fd_ratio" in limits:
        y_limit = dense_y * limits["max_fd_ratio"]
    x_limit = summary.speed.limit if summary.speed else None
    where = f"{summary.sampler.backend}, batch {summary.sampler.batch}"
    plot_speed_quality(points, out / "speed_quality.png", f"sampler speed-up over dense ({where})",
                       f"{name} (lower is better; bars: intervals)", x_limit, y_limit)  # fmt: skip
    doc.heading("Speed and quality")
    extra = ""
    if stacks:
        ref = frontier["reference"]["stack"]
        extra = (
            f" Grey: the frontier's {len(stacks)} stacks ({frontier['samples']} images each; speed-up "
            f"against dense {ref['scheduler']} {ref['steps']} steps on {frontier['backend']} at batch "
            f"{frontier['batch']}), the Pareto front dashed."
        )
    doc.para(
        f"Speed-up of the whole sampler ({summary.sampler.what}) against {name} from "
        f"{quality.num_samples} images per model; the shaded region meets both limits (the Frechet "
        "limit drawn from the gate on dense's figure)." + extra
    )
    doc.image(out / "speed_quality.png", "speed-quality chart")
