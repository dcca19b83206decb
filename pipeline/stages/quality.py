"""The ``quality`` stage: SSIM/PSNR vs dense from the same seeds, Frechet distances (finite-N and
FD-infinity) and KID, each with its paired interval; with ``quality.num_samples: auto`` sampled in
chunks until every quality gate is decided (repeated confidence intervals, compressor.sequential).

A conditional model's images are drawn with the run's prompts under guidance and decoded to pixels
(:meth:`pipeline.context.RunContext.sample_images`), so every figure above compares pixels at the
decoded image shape against the data's images; its prompt adherence (:mod:`compressor.adherence`: the
digits classifier's accuracy on the prompted digit, or CLIP score) is scored per model with its
interval and the paired compressed / dense ratio, and the prompts are recorded."""

from __future__ import annotations

import torch

from compressor.adherence import AdherenceMeasure, choose_adherence
from compressor.data import stack
from compressor.errors import UserError
from compressor.fd_infinity import FdInfScorer
from compressor.image_quality import inception_unavailable, make_scorer, psnr, resampling
from compressor.intervals import real_floor, ssim_figures
from compressor.models import as_noise_predictor
from compressor.persist import load_unet, student_sampling
from compressor.sequential import describe as describe_looks
from compressor.sequential import look_level, look_sizes
from deploy.runtimes import load_backend
from pipeline.acceptance import INCONCLUSIVE, quality_checks, verdict
from pipeline.context import RunContext, StageResult, log
from rundir import layout
from rundir.records import QualityMetrics

SECTIONS = ["quality", "sample", "data"]
INPUTS = ["prune", "finetune", "distill_steps", "export", "build"]
MODEL_LABELS = layout.MODEL_NAMES
COMPRESSED = layout.COMPRESSED_NAMES  # the final model is the first of these present


def _deployed(ctx: RunContext, backend: str, model: str):
    """A deployed backend (ONNX Runtime session or TensorRT engine) of the run."""
    ctx.require("export" if backend == "onnxruntime" else "build", "quality")
    level = ctx.cfg.sample.reuse_level
    return load_backend(backend, run_dir=ctx.run_dir, model=model, device=ctx.device, cache_level=level)


def run(ctx: RunContext) -> StageResult:
    """Sample every model of the run from the same seeds and score them: once at
    ``quality.num_samples``, or with ``auto`` in chunks until every quality gate is decided."""
    cfg = ctx.cfg.quality
    feature, metric = ctx.frechet_features()
    fd_note = _frechet_note(ctx, metric)
    predictors = _predictors(ctx, _models(ctx))
    adherence = _adherence(ctx, metric)
    reference = (stack(ctx.dataset, cfg.num_reference) + 1) / 2
    auto = cfg.num_samples == "auto"
    sizes = look_sizes(cfg.chunk_samples, cfg.max_samples) if auto else [cfg.num_samples]
    # every look's interval is a repeated confidence interval (one look: the plain interval)
    boot = resampling(cfg, ctx.cfg.seed, level=look_level(sizes, cfg.interval_level))
    scorer = None if fd_note else make_scorer(reference, feature, metric, boot, cfg.inception_weights)
    samples: dict = {label: None for label in predictors}
    adhering: dict = {label: None for label in predictors}  # per-image adherence scores
    looks: list[dict] = []
    for n in sizes:
        for label, predict in predictors.items():
            have = 0 if samples[label] is None else samples[label].shape[0]
            samples[label] = _draw(ctx, label, predict, samples[label], n)
            if adherence is not None and adherence.score is not None:  # the new images only
                new = adherence.score(samples[label][have:], have)
                adhering[label] = new if adhering[label] is None else torch.cat([adhering[label], new])
        results = _score(samples, metric, fd_note, boot, scorer)
        if adherence is not None:
            _score_adherence(results, adherence, adhering, boot)
        look = _look(ctx, results, metric, n)
        if auto:
            looks.append(look)
        if look["decided"]:
            break
    metrics = {
        "models": results,
        "num_samples": n,
        "num_reference": int(reference.shape[0]),
        "steps": cfg.steps or ctx.cfg.sample.steps,
        "scheduler": ctx.cfg.sample.scheduler,
        "cache_interval": ctx.cfg.sample.cache_interval,
        "backend": cfg.backend,
        "compressed_stack": ctx.stack.as_dict() if ctx.stack else None,
        "frechet_metric": metric,
        "frechet_note": fd_note,
        "interval": {**boot.describe(n), "level": cfg.interval_level, "look_level": boot.level},
        "kid_feature_scale": scorer.kid_scale if scorer else None,
        "student_steps": _student(ctx, "student")[1] if "student" in samples else None,
    }
    if adherence is not None:
        metrics.update(_adherence_summary(ctx, results, adherence))
    if auto:
        metrics["looks"] = looks
        metrics["sequential"] = describe_looks(sizes, cfg.interval_level)
    if metric == "fd_digits" and scorer is not None and reference.shape[0] >= 4:
        floor, floor_ci = real_floor(scorer.real, resampling(cfg, ctx.cfg.seed))
        metrics["fd_digits_real_floor"] = floor
        metrics["fd_digits_real_floor_ci"] = floor_ci
    return StageResult(metrics, [_save(ctx, samples)])


def _look(ctx: RunContext, results: dict, metric: str, n: int) -> dict:
    """One look at ``n`` samples per model: its figures and every quality gate's outcome; decided
    when no gate is inconclusive (a run without quality gates is decided at once)."""
    quality = QualityMetrics(models=results, frechet_metric=metric, num_samples=n, steps=0, scheduler="")
    checks = quality_checks(ctx.cfg.acceptance, quality)
    outcome = verdict(checks) if checks else "no quality gates"
    gates = [{"name": c.name, "measured": c.measured, "interval": c.interval, "outcome": c.outcome}
             for c in checks]  # fmt: skip
    shown = "; ".join(f"{g['name']} {g['outcome']}" for g in gates) or "no quality gates"
    log("quality", f"look at {n} samples per model: {shown}")
    decided = all(c.outcome != INCONCLUSIVE for c in checks)
    return {"samples": n, "models": results, "gates": gates, "outcome": outcome, "decided": decided}


def _adherence(ctx: RunContext, metric: str) -> AdherenceMeasure | None:
    """A conditional model's prompt adherence measure (None for an unconditional model: its record
    keeps no adherence entries)."""
    if ctx.dense.conditioning == "none":
        return None
    measure = choose_adherence(ctx.prompts, ctx.cfg.quality.clip_model, metric == "fd_digits", ctx.device)
    log("quality", f"prompt adherence: {measure.note}")
    return measure


def _score_adherence(results: dict, measure: AdherenceMeasure, scores: dict, boot) -> None:
    """Every model's adherence figures into ``results`` (compressed models: also the paired ratio to
    dense, same seeds and prompts)."""
    for label, vals in results.items():
        dense = scores["dense"] if label != "dense" else None
        vals.update(measure.figures(boot, scores[label], dense))
        if vals["adherence"] is not None:
            ci = vals["adherence_ci"]
            ratio = vals.get("adherence_ratio")
            rci = vals.get("adherence_ratio_ci")
            shown = f"{label}: {measure.metric} {vals['adherence']:.4g} [{ci[0]:.4g}, {ci[1]:.4g}]"
            if isinstance(ratio, float):
                shown += f", vs dense {ratio:.4g}" + (f" [{rci[0]:.4g}, {rci[1]:.4g}]" if rci else "")
            log("quality", shown)


def _adherence_summary(ctx: RunContext, results: dict, measure: AdherenceMeasure) -> dict:
    """The record's top-level conditional entries: the prompts and guidance, the adherence measure, and
    the final compressed model's adherence ratio to dense with its interval."""
    final = _final(results)
    figures = results.get(final, {}) if final else {}
    return {
        "prompts": ctx.prompts.summary(),
        "guidance_scale": ctx.cfg.sample.guidance_scale,
        "adherence_metric": measure.metric,
        "adherence_note": measure.note,
        "adherence_ratio": figures.get("adherence_ratio"),
        "adherence_ratio_ci": figures.get("adherence_ratio_ci"),
    }


def _frechet_note(ctx: RunContext, metric: str) -> str | None:
    """Why FID cannot run (None when it can); UserError when it must (``quality.require_fid``)."""
    cfg = ctx.cfg.quality
    if metric != "fid":
        return None
    reason = inception_unavailable(cfg.inception_weights)
    if reason and cfg.require_fid:
        raise UserError(
            f"quality.require_fid is set but FID cannot run ({reason}); install the `fid` extra and set "
            "quality.inception_weights to a local Inception weights file"
        )
    return f"fid unavailable: {reason}" if reason else None


def _models(ctx: RunContext) -> dict:
    """Label -> torch UNet: dense, pruned (unless ``compare_pruned`` is off and a finetuned model
    exists), finetuned and (``compare_raw``) finetune's raw weights."""
    models = {"dense": ctx.dense_on()}
    for stage, label in MODEL_LABELS.items():
        rec = ctx.record(stage)
        if rec is not None and rec.ok:  # a skipped finetune wrote no model
            models[label] = load_unet(layout.model_dir(ctx.run_dir, stage), ctx.device)[0]
    if not ctx.cfg.quality.compare_pruned:  # only the final model is gated; each costs as much as dense
        final = _final(models)
        for label in COMPRESSED:
            if label != final:
                models.pop(label, None)
    raw = layout.model_dir(ctx.run_dir, "finetune", raw=True)
    if ctx.cfg.quality.compare_raw and "finetuned" in models and raw.is_dir():
        # the raw (non-EMA) weights too, to show which copy is the better one
        models["finetuned (raw)"] = load_unet(raw, ctx.device)[0]
    if len(models) == 1:
        ctx.require("prune", "quality")
    return models


def _final(models: dict) -> str | None:
    """The label of the final compressed model among ``models`` (None when there is none)."""
    return next((label for label in COMPRESSED if label in models), None)


def _student(ctx: RunContext, label: str):
    """The student's (scheduler config, steps) when ``label`` is the few-step student, else None."""
    if label != "student":
        return None
    return student_sampling(layout.model_dir(ctx.run_dir, "distill_steps"))


def _predictors(ctx: RunContext, models: dict) -> dict:
    """Label -> noise predictor: torch (two passes with feature reuse), or the deployed backend.

    With a chosen stack the compressed models run its sampler: torch with its reuse split,
    and the final model through ONNX Runtime when the stack is fp16/int8 (the file that runs it).
    """
    stack = ctx.stack
    if stack is not None:
        level = ctx.cfg.sample.cache_level if stack.reuses_features else None
        predictors = {
            label: ctx.torch_predictor(unet)
            if label == "dense"
            else load_backend("torch", unet=unet, device=ctx.device, cache_level=level).predict
            for label, unet in models.items()
        }
        if stack.precision != "fp32":
            ctx.require("export", "quality")
            predictors[_final(models)] = load_backend(
                "onnxruntime", run_dir=ctx.run_dir, model="pruned", precision=stack.precision,
                cache_level=level,
            ).predict  # fmt: skip
        return predictors
    predictors = {
        label: as_noise_predictor(unet) if label == "student" else ctx.torch_predictor(unet)
        for label, unet in models.items()
    }  # a student samples with its own steps and no feature reuse
    if ctx.cfg.quality.backend != "torch":
        # the deployed sampler: dense and final compressed model served by the chosen backend
        final = _final(models)
        for label, model in (("dense", "dense"), (final, "pruned")):
            predictors[label] = _deployed(ctx, ctx.cfg.quality.backend, model).predict
    return predictors


def _draw(ctx: RunContext, label: str, predict, drawn, n: int):
    """One model's images extended to ``n`` from the run's seeds (image ``i`` from seed ``i``
    however the draws are chunked), with the run's sampler (compressed models: the chosen
    stack's, when a latency target over levers chose one; a student: its own steps)."""
    cfg, sample = ctx.cfg.quality, ctx.cfg.sample
    have = 0 if drawn is None else drawn.shape[0]
    variant = ctx.stack.variant if label != "dense" and ctx.stack else None
    student = _student(ctx, label)
    steps = cfg.steps or sample.steps
    scheduler, interval = sample.scheduler, sample.cache_interval
    if variant is not None:
        scheduler, steps, interval = variant.scheduler, variant.steps, variant.cache_interval
    if student is not None:
        variant, scheduler, steps, interval = None, "ddim", student[1], 1
    reuse = f", cache interval {interval}" if interval > 1 else ""
    log(
        "quality",
        f"sampling images {have}..{n - 1} from the {label} model ({scheduler} {steps} steps{reuse})",
    )
    desc = f"[quality] {label} images {have}..{n - 1}"
    images = ctx.sample_images(predict, n - have, steps, variant, student, start=have, desc=desc)
    return images if drawn is None else torch.cat([drawn, images])


def _score(samples: dict, metric: str, fd_note: str | None, boot, scorer) -> dict:
    """Every model's Frechet distance (finite-N and FD-infinity) and KID, and against dense (same
    seeds) the Frechet ratio and differences, KID difference, SSIM and PSNR, each quality figure
    with its paired interval."""
    results: dict[str, dict] = {label: {} for label in samples}
    if scorer is not None:
        fd_inf = FdInfScorer(scorer.stats, boot)
        scores = {label: scorer.score(imgs) for label, imgs in samples.items()}
        infs = {label: fd_inf.score(score.features) for label, score in scores.items()}
    for label, imgs in samples.items():
        if label != "dense":
            results[label].update(ssim_figures(boot, imgs, samples["dense"]))
            results[label]["psnr_vs_dense"] = psnr(imgs, samples["dense"])
        if scorer is None:
            results[label][metric] = None
            continue
        compressed = label != "dense"
        results[label].update(scorer.figures(scores[label], metric, scores["dense"] if compressed else None))
        results[label].update(fd_inf.figures(infs[label], infs["dense"] if compressed else None))
    for label, vals in results.items():
        log("quality", f"{label}: {shown(vals, metric)}")
    if fd_note:
        log("quality", fd_note)
    return results


def shown(vals: dict, metric: str) -> str:
    """One model's figures with their intervals, for a log line."""
    parts = []
    for key in ("fd_inf", "fd_inf_diff", metric, "kid", "kid_diff", "ssim_vs_dense", "psnr_vs_dense"):
        value = vals.get(key)
        if isinstance(value, float):
            ci = vals.get(f"{key}_ci")
            parts.append(f"{key} {value:.4g}" + (f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else ""))
    return ", ".join(parts) or "no figures"


def _save(ctx: RunContext, samples: dict):
    """Every model's samples in ``RUN/quality/samples.safetensors`` (atomically)."""
    from safetensors.torch import save_file

    ctx.stage_dir("quality")
    path = layout.quality_samples(ctx.run_dir)
    save_file({k: v.contiguous() for k, v in samples.items()}, str(path.with_suffix(".tmp")))
    path.with_suffix(".tmp").replace(path)
    return path
