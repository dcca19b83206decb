"""The ``train`` stage: train the dense model from its initialisation (e.g. the demo base model)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tqdm import tqdm

from compressor.persist import dense_config, save_unet
from pipeline.context import RunContext, StageResult, log

SECTIONS = ["model", "data", "finetune", "seed"]
INPUTS: list[str] = []


def run(ctx: RunContext) -> StageResult:
    """Train with the ``finetune`` recipe; writes ``RUN/train/model`` and a diffusers folder."""
    result = _fit(ctx, ctx.dense.unet, "train")
    if not ctx.is_main:  # data-parallel ranks: only rank 0 writes (all ranks hold the same weights)
        return StageResult(_train_metrics(result))
    out = ctx.stage_dir("train")
    files = save_unet(result.ema_unet.cpu(), out / "model", dense_config(ctx.dense.unet))
    folder = out / "diffusers"
    result.ema_unet.save_pretrained(str(folder), safe_serialization=True)
    (folder / "scheduler_config.json").write_text(json.dumps(ctx.dense.scheduler_config, indent=2))
    files += [
        folder / "config.json",
        folder / "diffusion_pytorch_model.safetensors",
        folder / "scheduler_config.json",
    ]
    log("train", f"wrote {out / 'model'} and the diffusers folder {folder}")
    return StageResult(_train_metrics(result), files)


def checkpoint_dir(ctx: RunContext, stage: str) -> Path:
    """Checkpoints of this exact stage input (cache key); stale ones of other inputs are removed.

    A rerun after the pruned model or the recipe changed must start afresh, and so must a
    forced one (--force), while a rerun of an interrupted identical stage resumes. Stale
    folders are removed only once the new run has succeeded.
    """
    root = ctx.stage_dir(stage) / "checkpoints"
    mine = root / ctx.stage_key[:16]
    if ctx.is_main and ctx.forced and mine.is_dir():
        shutil.rmtree(mine)
    return mine


def drop_stale_checkpoints(ctx: RunContext, stage: str) -> None:
    """After a successful run: remove checkpoints that belong to other stage inputs."""
    root = ctx.stage_dir(stage) / "checkpoints"
    mine = root / ctx.stage_key[:16]
    if ctx.is_main:
        for other in root.iterdir():
            if other.is_dir() and other != mine:
                shutil.rmtree(other)


def _fit(ctx: RunContext, unet, stage: str):
    from compressor.training import train

    cfg = ctx.cfg.finetune
    with tqdm(total=cfg.steps, desc=f"[{stage}]", unit="step", disable=not ctx.is_main) as bar:

        def on_step(step: int, loss: float, sps: float) -> None:
            bar.n = step
            bar.set_postfix(loss=f"{loss:.4f}", it_s=f"{sps:.2f}")
            bar.refresh()

        result = train(
            unet,
            ctx.noise_scheduler(),
            ctx.dataset,
            cfg,
            checkpoint_dir(ctx, stage),
            ctx.cfg.seed,
            ctx.device,
            resume=True,
            on_step=on_step,
        )
    drop_stale_checkpoints(ctx, stage)
    if result.resumed_from is not None:
        log(stage, f"resumed from the checkpoint at step {result.resumed_from}")
    return result


def _train_metrics(result) -> dict:
    return {
        "losses": result.losses,
        "final_loss": result.losses[-1][1] if result.losses else None,
        "resumed_from": result.resumed_from,
        "steps_per_second": result.steps_per_second,
        "processes": result.world_size,
    }
