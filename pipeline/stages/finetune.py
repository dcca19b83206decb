"""The ``finetune`` stage: recover the pruned model's quality; the EMA copy is kept."""

from __future__ import annotations

from compressor.data import stack
from compressor.image_quality import denoising_eval_loss
from compressor.persist import load_unet, read_structure, save_unet
from pipeline.context import RunContext, StageResult, log
from pipeline.fitting import fit, train_metrics
from rundir import layout

SECTIONS = ["finetune", "data", "seed"]
INPUTS = ["prune"]


def run(ctx: RunContext) -> StageResult:
    """Finetune ``RUN/prune/model``; writes ``RUN/finetune/model`` (EMA) and ``model-raw``."""
    ctx.require("prune", "finetune")
    if ctx.stack is not None and ctx.stack.ratio == 0:
        reason = (
            "the latency target's frontier chose the dense model (ratio 0): nothing was pruned to recover"
        )
        log("finetune", f"skipped: {reason}")
        return StageResult(status="skipped", reason=reason)
    src = layout.model_dir(ctx.run_dir, "prune")
    unet, meta = load_unet(src, ctx.device)
    result = fit(ctx, unet, "finetune")
    if not ctx.is_main:  # data-parallel ranks: only rank 0 writes (all ranks hold the same weights)
        return StageResult(train_metrics(result))
    ctx.stage_dir("finetune")
    structure = read_structure(src)
    files = []
    for raw, model in ((False, result.ema_unet), (True, result.unet)):
        files += save_unet(
            model.cpu(),
            layout.model_dir(ctx.run_dir, "finetune", raw=raw),
            structure["unet_config"],
            structure["history"],
            structure["kept_widths"],
            extra={"scheduler_config": structure.get("scheduler_config"), "finetuned_from": "prune/model"},
        )
    images, cond = _eval_batch(ctx)
    sched = ctx.noise_scheduler()
    metrics = train_metrics(result)
    for name, model in (("eval_loss_ema", result.ema_unet), ("eval_loss_raw", result.unet)):
        metrics[name] = denoising_eval_loss(model, sched, images, ctx.cfg.seed, conditioning=cond)
    log("finetune", f"eval loss: EMA {metrics['eval_loss_ema']:.4f}, raw {metrics['eval_loss_raw']:.4f}")
    return StageResult(metrics, files)


def _eval_batch(ctx: RunContext, count: int = 16) -> tuple:
    """The first ``count`` training samples (latents of a latent model, on the CPU where the saved
    models are), with their conditions for a conditioned model (None for an unconditional one)."""
    if ctx.dense.conditioning == "none":
        return stack(ctx.training_data, count), None
    data = ctx.conditioned_data
    idx = list(range(min(count, len(data))))
    return data.samples(idx), data.conditions(idx)
