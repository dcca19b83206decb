"""Training shared by the ``train`` and ``finetune`` stages: checkpoints keyed by the stage's
cache key, progress, resume, and the metrics both record."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from compressor.config import DistillConfig
from compressor.progress import progress_bar
from compressor.training import train
from pipeline.context import RunContext, log
from rundir import layout


def checkpoint_dir(ctx: RunContext, stage: str) -> Path:
    """Checkpoints of this exact stage input (cache key); stale ones of other inputs are removed.

    A rerun after the pruned model or the recipe changed must start afresh, and so must a
    forced one (--force), while a rerun of an interrupted identical stage resumes. Stale
    folders are removed only once the new run has succeeded.
    """
    ctx.stage_dir(stage)
    root = layout.checkpoints_dir(ctx.run_dir, stage)
    mine = root / _key(ctx)
    if ctx.is_main and ctx.call is not None and ctx.call.forced and mine.is_dir():
        shutil.rmtree(mine)
    return mine


def _key(ctx: RunContext) -> str:
    """The checkpoint folder's name: the stage call's cache key, cut to 16 characters."""
    return (ctx.call.key if ctx.call is not None else "no-key")[:16]


def drop_stale_checkpoints(ctx: RunContext, stage: str) -> None:
    """After a successful run: remove checkpoints that belong to other stage inputs."""
    root = layout.checkpoints_dir(ctx.run_dir, stage)
    mine = root / _key(ctx)
    if ctx.is_main:
        for other in root.iterdir():
            if other.is_dir() and other != mine:
                shutil.rmtree(other)


@contextlib.contextmanager
def step_bar(ctx: RunContext, total: int, desc: str) -> Iterator[Callable[[int, float, float], None]]:
    """A training progress bar (main process only); yields the ``on_step`` callback that moves it.

    ``on_step(step, loss, steps_per_second)`` takes the absolute step (a resumed run starts past 0).
    """
    with progress_bar(total, desc, "step", disable=not ctx.is_main) as bar:

        def on_step(step: int, loss: float, sps: float) -> None:
            bar.set_postfix(loss=f"{loss:.4f}", it_s=f"{sps:.2f}")
            bar.update(step - bar.n)

        yield on_step


def fit(ctx: RunContext, unet, stage: str):
    """Train ``unet`` with the finetune recipe, resuming this stage input's last checkpoint."""

    cfg = ctx.cfg.finetune
    teacher = None
    if cfg.distill.active and stage == "finetune":  # the dense model the pruned one came from
        teacher = ctx.dense_on()
        d = cfg.distill
        log(
            stage,
            f"distilling from the dense model: task x {d.weight_task:g}, output x {d.weight_output:g}, "
            f"features x {d.weight_features:g}"
            + (f" at {', '.join(d.feature_points)}" if d.weight_features > 0 else ""),
        )
    elif cfg.distill.active and cfg.distill != DistillConfig():  # set by the user, not the default
        log(stage, "finetune.distill is ignored here: the dense model has no teacher")
    # a latent or conditioned model trains on its encoded data, dropping conditions by finetune.cond_dropout
    data = ctx.training_data
    with step_bar(ctx, cfg.steps, f"[{stage}]") as on_step:
        result = train(
            unet,
            ctx.noise_scheduler(),
            data,
            cfg,
            checkpoint_dir(ctx, stage),
            ctx.cfg.seed,
            ctx.device,
            resume=True,
            on_step=on_step,
            teacher=teacher,
        )
    drop_stale_checkpoints(ctx, stage)
    if result.resumed_from is not None:
        log(stage, f"resumed from the checkpoint at step {result.resumed_from}")
    return result


def train_metrics(result) -> dict:
    """What the train and finetune records hold about the run."""
    return {
        "losses": result.losses,
        "final_loss": result.losses[-1][1] if result.losses else None,
        "resumed_from": result.resumed_from,
        "steps_per_second": result.steps_per_second,
        "processes": result.world_size,
        "loss_terms": result.loss_terms,  # distillation: [step, task, output, features]
    }
