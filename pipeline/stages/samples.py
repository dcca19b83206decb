"""The ``samples`` stage: dense and compressed samples side by side from the same seeds.

A conditional model samples image ``i`` with the run's prompt ``i`` (cycling; see
:mod:`compressor.prompts`) under ``sample.guidance_scale``; the stage then also draws
``RUN/samples/prompts.png``, each prompt on a row with every model's image of the same seed.
"""

from __future__ import annotations

from compressor.models import as_noise_predictor
from compressor.persist import load_unet, student_sampling
from compressor.sampling import save_comparison
from pipeline.context import RunContext, StageResult, log
from pipeline.plots import plot_prompt_pairs
from rundir import layout

SECTIONS = ["sample"]
INPUTS = ["prune", "finetune", "distill_steps"]
STUDENT = layout.MODEL_NAMES["distill_steps"]
LABELS = layout.MODEL_NAMES  # the report's names


def run(ctx: RunContext) -> StageResult:
    """Write ``RUN/samples/grid.png``: dense, pruned, finetuned and student rows (those that ran)."""

    cfg = ctx.cfg.sample
    rows = {}
    models = {"dense": ctx.dense_on()}
    for stage, label in LABELS.items():
        rec = ctx.record(stage)
        if rec is not None and rec.ok:  # a skipped finetune wrote no model
            models[label] = load_unet(layout.model_dir(ctx.run_dir, stage), ctx.device)[0]
    if len(models) == 1:
        ctx.require("prune", "samples")
    for label, unet in models.items():
        student = (
            student_sampling(layout.model_dir(ctx.run_dir, "distill_steps")) if label == STUDENT else None
        )
        n = student[1] if student else cfg.steps
        solver = "DDIM" if student else cfg.scheduler.upper()
        log("samples", f"{label}: {cfg.num_images} images, {solver} {n} steps")
        predict = as_noise_predictor(unet) if student else ctx.torch_predictor(unet)
        rows[f"{label} ({n} steps)" if student else label] = ctx.sample_images(
            predict, cfg.num_images, cfg.steps, student=student, desc=f"[samples] {label}"
        )
    ctx.stage_dir("samples")
    path = save_comparison(rows, layout.samples_grid(ctx.run_dir))
    log("samples", f"wrote {path}")
    metrics = {"rows": list(rows), "num_images": cfg.num_images, "steps": cfg.steps}
    files = [path]
    if ctx.dense.conditioning != "none":
        prompts = ctx.prompts
        shown = min(len(prompts), cfg.num_images)
        metrics.update(prompts=prompts.for_images(cfg.num_images), guidance_scale=cfg.guidance_scale)
        metrics["negative_prompt"] = prompts.negative
        pairs = {label: images[:shown] for label, images in rows.items()}
        files.append(plot_prompt_pairs(prompts.for_images(shown), pairs, layout.prompt_pairs(ctx.run_dir)))
        log("samples", f"wrote {files[-1]} ({shown} prompts, guidance {cfg.guidance_scale:g})")
    return StageResult(metrics, files)
