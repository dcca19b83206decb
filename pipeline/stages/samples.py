"""The ``samples`` stage: dense and compressed samples side by side from the same seeds."""

from __future__ import annotations

from compressor import runlayout
from compressor.models import as_noise_predictor
from compressor.persist import load_unet
from compressor.sampling import generate, make_scheduler, save_comparison
from deploy.runtimes import load_backend
from pipeline.context import RunContext, StageResult, log

SECTIONS = ["sample"]
INPUTS = ["prune", "finetune"]


def run(ctx: RunContext) -> StageResult:
    """Write ``RUN/samples/grid.png``: dense, pruned and (if run) finetuned rows."""
    cfg = ctx.cfg.sample
    scheduler = make_scheduler(cfg.scheduler, ctx.dense.scheduler_config)
    shape = ctx.image_shape()
    rows = {}
    models = {"dense": ctx.dense_on()}
    for stage in ("prune", "finetune"):
        if ctx.record(stage):
            models[{"prune": "pruned", "finetune": "pruned + finetuned"}[stage]] = load_unet(
                runlayout.model_dir(ctx.run_dir, stage), ctx.device
            )[0]
    if len(models) == 1:
        ctx.require("prune", "samples")
    level = cfg.cache_level if cfg.cache_interval > 1 else None
    for label, unet in models.items():
        log("samples", f"{label}: {cfg.num_images} images, {cfg.scheduler.upper()} {cfg.steps} steps")
        predict = (
            load_backend("torch", unet=unet, device=ctx.device, cache_level=level).predict
            if level is not None
            else as_noise_predictor(unet)
        )
        rows[label] = generate(
            predict,
            scheduler,
            shape,
            cfg.num_images,
            cfg.steps,
            cfg.eta,
            cfg.seed,
            cfg.batch_size,
            ctx.device,
            cache_interval=cfg.cache_interval,
            cache_schedule=cfg.cache_schedule,
        )
    ctx.stage_dir("samples")
    path = save_comparison(rows, runlayout.samples_grid(ctx.run_dir))
    log("samples", f"wrote {path}")
    return StageResult({"rows": list(rows), "num_images": cfg.num_images, "steps": cfg.steps}, [path])
