"""The ``train`` stage: train the dense model from its initialisation (e.g. the demo base model)."""

from __future__ import annotations

import json

from compressor.persist import dense_config, save_unet
from pipeline.context import RunContext, StageResult, log
from pipeline.fitting import fit, train_metrics
from rundir import layout

SECTIONS = ["model", "data", "finetune", "seed"]
INPUTS: list[str] = []


def run(ctx: RunContext) -> StageResult:
    """Train with the ``finetune`` recipe; writes ``RUN/train/model`` and a diffusers folder."""
    result = fit(ctx, ctx.dense_on(), "train")
    if not ctx.is_main:  # data-parallel ranks: only rank 0 writes (all ranks hold the same weights)
        return StageResult(train_metrics(result))
    ctx.stage_dir("train")
    model_dir = layout.model_dir(ctx.run_dir, "train")
    files = save_unet(result.ema_unet.cpu(), model_dir, dense_config(ctx.dense.unet))
    folder = layout.diffusers_dir(ctx.run_dir)
    result.ema_unet.save_pretrained(str(folder), safe_serialization=True)
    (folder / layout.SCHEDULER_CONFIG).write_text(json.dumps(ctx.dense.scheduler_config, indent=2))
    files += [
        folder / "config.json",
        folder / "diffusion_pytorch_model.safetensors",
        folder / layout.SCHEDULER_CONFIG,
    ]
    log("train", f"wrote {model_dir} and the diffusers folder {folder}")
    return StageResult(train_metrics(result), files)
