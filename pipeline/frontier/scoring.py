"""Jobs: the quality of every stack, against the dense reference sampler's images from the same
seeds: the Frechet distance and KID with the quality stage's features, SSIM, each with its paired
interval. fp32 stacks sample in torch (the same images on every backend), fp16 and int8 through
ONNX Runtime.

A conditional model's stacks (text or class) sample image ``i`` with the run's prompt ``i`` (cycled,
:attr:`pipeline.context.RunContext.prompts`) under ``sample.guidance_scale`` (a few-step student: 1.0,
:func:`~pipeline.frontier.grid.stack_guidance`), decoded by the dense VAE, so every stack and the
reference share seeds and prompts; each stack also gets its prompt adherence
(:mod:`compressor.adherence`) with its interval and the paired compressed / dense ratio."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from compressor.adherence import choose_adherence
from compressor.data import stack
from compressor.fd_infinity import FdInf, FdInfScorer
from compressor.guidance import model_decoder
from compressor.image_quality import make_scorer, resampling
from compressor.intervals import ssim_figures
from compressor.persist import load_unet, student_sampling
from compressor.progress import log
from compressor.sampling import generate, make_scheduler
from compressor.stack import Stack
from deploy.runtimes import load_backend
from pipeline.context import RunContext, StageCall
from pipeline.frontier.grid import Spec, stack_guidance
from pipeline.frontier.nested import model_run, ratio_config, ratio_key, sampling_settings
from pipeline.sweep.cells import cached, key_of
from rundir import layout
from rundir.artifacts import write_json
from rundir.records import final_model_dir


def job_context(cfg, run: Path, stage: str = "quality") -> RunContext:
    """A frontier job's context on a nested run, bound as the stage whose work it does (``quality``
    scores, ``bench`` times), so a conditional model is taken as those stages take it."""
    return RunContext(cfg, run).at_stage(StageCall(stage, "frontier"))


def replicates_file(spec: Spec, stack: Stack) -> Path:
    """Where a stack's Frechet replicates (one per jackknife group or bootstrap draw) are kept."""
    return layout.frontier_points_dir(spec.root) / f"{stack.key()}.fd-replicates.npy"


def fd_inf_replicates_file(spec: Spec, key: str) -> Path:
    """Where a stack's (or ``"reference"``'s) FD-infinity replicates are kept."""
    return layout.frontier_points_dir(spec.root) / f"{key}.fd-inf-replicates.npy"


def load_replicates(spec: Spec, stacks: list[Stack]) -> dict:
    """Stack key -> the replicates of its ranking figure (float64 tensor): FD-infinity's where every
    stack has them, else the finite-N Frechet distance's, for the stacks :func:`score_stack` scored."""
    import numpy as np
    import torch

    inf = all(fd_inf_replicates_file(spec, s.key()).is_file() for s in stacks)
    path = (lambda s: fd_inf_replicates_file(spec, s.key())) if inf else (lambda s: replicates_file(spec, s))
    return {s.key(): torch.from_numpy(np.load(path(s))) for s in stacks}


def _save(path: Path, array) -> None:
    """``array`` (a tensor) to ``path`` as .npy, atomically."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array.numpy())
    tmp.replace(path)


def reference_images(spec: Spec) -> dict:
    """Job: the dense reference sampler's images (torch fp32) and their Frechet distance."""
    import torch

    if spec.threads:
        torch.set_num_threads(spec.threads)
    cfg = ratio_config(spec, 0.0)
    ref = spec.reference
    path = layout.frontier_points_dir(spec.root) / "reference.json"
    fingerprint = key_of(sampling_settings(cfg), str(ref), spec.samples)
    images_file = layout.frontier_points_dir(spec.root) / "reference-images.npy"
    found = cached(path, fingerprint)
    ctx = job_context(cfg, layout.frontier_ratio_dir(spec.root, 0.0))
    if found is not None and images_file.is_file() and "fd_inf" in found and _has_adherence(ctx, found):
        return found
    log("frontier", f"reference: dense {ref.scheduler} {ref.steps} steps, {spec.samples} images")
    images = stack_images(ctx, ctx.torch_predictor(ctx.dense.unet), ref.scheduler, ctx.dense.scheduler_config,
                          spec.samples, ref.steps, guidance=cfg.sample.guidance_scale)  # fmt: skip
    scorer, metric = make_frontier_scorer(ctx)
    score = scorer.score(images)
    _save(images_file, images)
    adherence = {}
    measure = adherence_measure(ctx, metric)
    if measure is not None:  # a conditional model: its per-image adherence, kept for the paired ratios
        scores = measure.score(images, 0) if measure.score else None
        if scores is not None:
            _save(adherence_file(spec, "reference"), scores)
        adherence = {"conditioning": ctx.dense.conditioning, "guidance_scale": cfg.sample.guidance_scale,
                     **measure.figures(scorer.boot, scores)}  # fmt: skip
    _save(layout.frontier_points_dir(spec.root) / "reference-fd-replicates.npy", score.fd_reps)
    fd_inf = FdInfScorer(scorer.stats, scorer.boot)
    inf = fd_inf.score(score.features)
    _save(fd_inf_replicates_file(spec, "reference"), inf.reps)
    figures = scorer.figures(score, "fd") | fd_inf.figures(inf)
    result = {"fingerprint": fingerprint, "metric": metric, "reference": str(ref), **figures, **adherence}
    write_json(path, result)
    return result


def stack_images(ctx: RunContext, predict, scheduler: str, scheduler_config: dict, count: int, steps: int,
                 cache_interval: int = 1, guidance: float = 1.0) -> torch.Tensor:  # fmt: skip
    """``count`` images from the run's seeds (``sample.seed``..) with ``predict`` under ``scheduler`` at
    ``steps``: a conditional model's image ``i`` with the run's prompt ``i`` under ``guidance``, its
    latents decoded by the dense VAE (pixels in [0, 1] either way); an unconditional model's as
    :func:`compressor.sampling.generate` draws them."""
    cfg = ctx.cfg
    conditional = {}
    if ctx.dense.conditioning != "none":
        conditional = {
            "conditioning": ctx.prompts.conditioning(ctx.dense, count, 0),
            "guidance_scale": guidance,
            "decode": model_decoder(ctx.dense),
        }
    return generate(
        predict, make_scheduler(scheduler, scheduler_config), ctx.image_shape(), count, steps,
        seed=cfg.sample.seed, batch_size=cfg.sample.batch_size, cache_interval=cache_interval,
        cache_schedule=cfg.sample.cache_schedule, **conditional,
    )  # fmt: skip


def adherence_file(spec: Spec, key: str) -> Path:
    """Where a stack's (or ``"reference"``'s) per-image prompt adherence scores are kept."""
    return layout.frontier_points_dir(spec.root) / f"{key}.adherence.npy"


def adherence_measure(ctx: RunContext, metric: str):
    """A conditional model's prompt adherence measure (:func:`compressor.adherence.choose_adherence`),
    None for an unconditional one (its points keep no adherence entries)."""
    if ctx.dense.conditioning == "none":
        return None
    return choose_adherence(ctx.prompts, ctx.cfg.quality.clip_model, metric == "fd_digits", ctx.device)


def _has_adherence(ctx: RunContext, found: dict) -> bool:
    """Whether a cached result has what its model needs (a conditional one: adherence entries)."""
    return ctx.dense.conditioning == "none" or "adherence" in found


def make_frontier_scorer(ctx):
    """The quality stage's scorer (features, KID scale, bootstrap) for a frontier job, and the metric."""

    feature, metric = ctx.frechet_features()
    real = (stack(ctx.dataset, ctx.cfg.quality.num_reference) + 1) / 2
    return make_scorer(
        real, feature, metric, resampling(ctx.cfg.quality, ctx.cfg.seed), ctx.cfg.quality.inception_weights
    ), metric


def score_stack(spec: Spec, stack: Stack) -> dict:
    """Job: a stack's Frechet distance and SSIM vs the reference images (needs :func:`reference_images`)."""
    import numpy as np
    import torch

    if spec.threads:
        torch.set_num_threads(spec.threads)
    cfg = ratio_config(spec, stack.ratio)
    path = layout.frontier_points_dir(spec.root) / f"{stack.key()}.quality.json"
    student = stack.student_steps > 0
    fingerprint = key_of(
        ratio_key(spec, stack.ratio, student), stack.as_dict(), spec.samples, str(spec.reference)
    )
    found = cached(path, fingerprint)
    run, model = model_run(spec, stack.ratio, student)
    ctx = job_context(cfg, run)
    if found is not None and "fd_inf" in found and fd_inf_replicates_file(spec, stack.key()).is_file():
        if _has_adherence(ctx, found):
            return found  # (a point cached before FD-infinity is scored again)
    level = cfg.sample.cache_level if stack.cache_interval > 1 else None
    sched_cfg = ctx.dense.scheduler_config
    folder = final_model_dir(run)[1] if model != "dense" else None
    if student:  # this round's student, sampled with the schedule it was trained for
        folder = layout.student_round_dir(run, stack.student_steps)
        sched_cfg = student_sampling(folder)[0]
    if stack.precision == "fp32":  # the same images on every backend: torch
        unet = ctx.dense.unet if folder is None else load_unet(folder)[0]
        predict = load_backend("torch", unet=unet, cache_level=level).predict
    else:  # fp16 / int8: the ONNX file that runs them (a student's: its nested run's last round)
        predict = load_backend("onnxruntime", run_dir=run, model=model, precision=stack.precision,
                               threads=spec.threads, cache_level=level).predict  # fmt: skip
    log("frontier", f"quality: {stack.label()}, {spec.samples} images")
    images = stack_images(ctx, predict, stack.scheduler, sched_cfg, spec.samples, stack.steps,
                          stack.cache_interval, stack_guidance(cfg, stack))  # fmt: skip
    scorer, metric = make_frontier_scorer(ctx)
    score = scorer.score(images)
    points = layout.frontier_points_dir(spec.root)
    reference = torch.from_numpy(np.load(points / "reference-images.npy"))
    ref = json.loads((points / "reference.json").read_text())  # the reference job's figures
    ref_reps = torch.from_numpy(np.load(points / "reference-fd-replicates.npy"))
    ratio = score.fd / ref["fd"]
    fd_inf = FdInfScorer(scorer.stats, scorer.boot)
    inf = fd_inf.score(score.features)
    ref_inf = FdInf(ref["fd_inf"], torch.from_numpy(np.load(fd_inf_replicates_file(spec, "reference"))))
    result = {
        "fingerprint": fingerprint,
        "metric": metric,
        **scorer.figures(score, "fd"),
        "fd_ratio": ratio,
        "fd_ratio_ci": scorer.boot.interval(ratio, score.fd_reps / ref_reps),
        **fd_inf.figures(inf, ref_inf),
    }
    sim = ssim_figures(scorer.boot, images, reference)
    result.update(ssim=sim["ssim_vs_dense"], ssim_ci=sim["ssim_vs_dense_ci"])
    measure = adherence_measure(ctx, metric)
    if measure is not None:  # same seeds and prompts as the reference: the paired ratio
        scores = measure.score(images, 0) if measure.score else None
        dense_file = adherence_file(spec, "reference")
        dense = torch.from_numpy(np.load(dense_file)) if scores is not None and dense_file.is_file() else None
        result.update(measure.figures(scorer.boot, scores, dense))
    _save(replicates_file(spec, stack), score.fd_reps)  # for the paired differences between stacks
    _save(fd_inf_replicates_file(spec, stack.key()), inf.reps)  # (choice.py)
    write_json(path, result)
    return result
