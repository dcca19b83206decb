"""Measure a frontier: fit every ratio, score every stack (jobs), time every stack (here)."""

from __future__ import annotations

import dataclasses

from compressor.fd_infinity import replicate_plan
from compressor.image_quality import resampling
from compressor.progress import progress_bar
from compressor.stack import Stack
from pipeline.context import log
from pipeline.frontier.choice import (
    ADHERENCE_KEYS,
    FD_INF_KEYS,
    QUALITY_KEYS,
    mark_noise,
    pareto,
    ranking_key,
)
from pipeline.frontier.fits import fit_ratio, fit_students
from pipeline.frontier.grid import Spec
from pipeline.frontier.jobs import run_jobs
from pipeline.frontier.scoring import load_replicates, reference_images, score_stack
from pipeline.frontier.timing import time_stacks


def measure(spec: Spec, ray: str | None = None, cpus: int | None = None) -> dict:
    """Fit every ratio, score every stack (jobs), time every stack (here); the frontier as a dict."""
    stacks = spec.grid.stacks()
    ratios = sorted({s.ratio for s in stacks} | {0.0})
    log("frontier", f"{len(stacks)} stacks over {len(ratios)} pruning ratios -> {spec.root}")
    fitted = {r["ratio"]: r for r in run_jobs(fit_ratio, [(spec, r) for r in ratios], ray, cpus)}
    taught = sorted({s.ratio for s in stacks if s.student_steps})
    students = {r["ratio"]: r for r in run_jobs(fit_students, [(spec, r) for r in taught], ray, cpus)}
    ref = run_jobs(reference_images, [(spec,)], ray, cpus)[0]
    scores = dict(zip(stacks, run_jobs(score_stack, [(spec, s) for s in stacks], ray, cpus), strict=True))
    bar = progress_bar(len(stacks), "[frontier] timing", "stack", leave=False)

    def shown(stack: Stack, t: dict) -> None:
        bar.update(1)
        log("frontier", f"{stack.label()}: {t['latency_ms']:.1f} ms, {t['speedup']:.2f}x, "
                        f"{ref['metric']} {scores[stack]['fd']:.2f}, "
                        f"FD-infinity {scores[stack]['fd_inf']:.2f}")  # fmt: skip

    try:
        times = time_stacks(spec, stacks, shown)
    finally:
        bar.close()
    conditional = "conditioning" in ref  # a conditional model: whole calls, prompts, adherence
    batches = spec.timed_batches
    points = []
    for stack in stacks:
        q, t = scores[stack], times[stack]
        points.append({
            "stack": stack.as_dict(), "key": stack.key(), "label": stack.label(),
            "macs_kept": fitted[stack.ratio]["macs_kept"] if stack.ratio else 1.0,
            "latency_ms": t["latency_ms"], "reference_ms": t["reference_ms"], "speedup": t["speedup"],
            **{k: q[k] for k in QUALITY_KEYS}, **{k: q.get(k) for k in FD_INF_KEYS},
        })  # fmt: skip
        if conditional:
            points[-1].update({k: q.get(k) for k in ADHERENCE_KEYS})
        if conditional or len(batches) > 1:  # every timed batch (a whole call: by component too)
            points[-1]["by_batch"] = {
                str(b): {k: v for k, v in t["by_batch"][b].items() if k not in ("fingerprint", "host")}
                for b in batches
            }
        if stack.student_steps:  # what its distillation cost: the rounds down to it
            rounds = students[stack.ratio]["round_costs"]
            points[-1]["student_training"] = {
                "wall_s": round(sum(r["wall_s"] for r in rounds if r["steps"] >= stack.student_steps), 2),
                "optimizer_steps": sum(
                    r["optimizer_steps"] for r in rounds if r["steps"] >= stack.student_steps
                ),
            }
    for p, flag in zip(points, pareto(points), strict=True):
        p["pareto"] = flag
    cfg = spec.config()
    q = cfg.quality
    boot = resampling(q, cfg.seed)  # the scorers' own (FD-infinity's: at most 100 replicates)
    ranked_by = ranking_key(points)
    mark_noise(points, load_replicates(spec, stacks), replicate_plan(boot) if ranked_by == "fd_inf" else boot)
    extra = {}
    if conditional or len(batches) > 1:
        extra["batches"] = batches
    if conditional:
        extra.update(
            whole_call="text encoder + guided UNet loop + VAE decoder" if ref["conditioning"] == "text"
            else "guided UNet loop + VAE decoder",
            conditioning=ref["conditioning"], guidance_scale=ref["guidance_scale"],
            adherence_metric=ref.get("adherence_metric"), adherence_note=ref.get("adherence_note"),
        )  # fmt: skip
    return {
        "config": cfg.name,
        "model": cfg.model.name,
        "backend": spec.backend,
        "batch": spec.batch,
        "threads": spec.threads,
        "samples": spec.samples,
        "metric": ref["metric"],
        "reference": {
            "stack": Stack(0.0, spec.reference.scheduler, spec.reference.steps).as_dict(),
            **{k: ref.get(k) for k in ("fd", "fd_ci", "fd_inf", "fd_inf_ci", "kid", "kid_std", "kid_ci")},
            **({k: ref.get(k) for k in ("adherence", "adherence_ci")} if conditional else {}),
        },  # fmt: skip
        "ranked_by": ranked_by,
        "interval": {
            "level": q.interval_level,
            "resamples": q.resamples,
            "method": q.interval_method,
            "within_noise": "the paired interval of the Frechet difference holds zero"
            + (" (FD-infinity)" if ranked_by == "fd_inf" else ""),
        },  # fmt: skip
        "grid": dataclasses.asdict(spec.grid),
        "ratios": {f"{r:g}": fitted[r] for r in ratios},
        "students": {f"{r:g}": students[r] for r in taught},
        "points": points,
        **extra,
    }
