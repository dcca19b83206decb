"""The ``samples`` stage: dense and compressed samples side by side from the same seeds."""

from __future__ import annotations

from compressor import runlayout
from compressor.persist import load_unet
from compressor.sampling import save_comparison
from pipeline.context import RunContext, StageResult, log

SECTIONS = ["sample"]
INPUTS = ["prune", "finetune"]


def run(ctx: RunContext) -> StageResult:
    """Write ``RUN/samples/grid.png``: dense, pruned and (if run) finetuned rows."""
    cfg = ctx.cfg.sample
    rows = {}
    models = {"dense": ctx.dense_on()}
    for stage in ("prune", "finetune"):
        rec = ctx.record(stage)
        if rec is not None and rec.ok:  # a skipped finetune wrote no model
            models[{"prune": "pruned", "finetune": "pruned + finetuned"}[stage]] = load_unet(
                runlayout.model_dir(ctx.run_dir, stage), ctx.device
            )[0]
    if len(models) == 1:
        ctx.require("prune", "samples")
    for label, unet in models.items():
        log("samples", f"{label}: {cfg.num_images} images, {cfg.scheduler.upper()} {cfg.steps} steps")
        rows[label] = ctx.sample_images(ctx.torch_predictor(unet), cfg.num_images, cfg.steps)
    ctx.stage_dir("samples")
    path = save_comparison(rows, runlayout.samples_grid(ctx.run_dir))
    log("samples", f"wrote {path}")
    return StageResult({"rows": list(rows), "num_images": cfg.num_images, "steps": cfg.steps}, [path])
