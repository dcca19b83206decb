"""The ``prune`` stage: Diff-Pruning (or a baseline) of the dense UNet."""

from __future__ import annotations

import copy
import dataclasses
import time

import torch
from tqdm import tqdm

from compressor import runlayout
from compressor.data import taylor_and_holdout
from compressor.models import count_macs_params
from compressor.persist import dense_config, save_unet
from compressor.pruning import prune_unet
from compressor.quality import denoising_eval_loss
from pipeline.context import RunContext, StageResult, environment_facts, log

SECTIONS = ["model", "data", "prune", "seed"]
INPUTS: list[str] = []


def key_extra(ctx: RunContext) -> dict:
    """A latency target also depends on the host, the backend's libraries and the sampler's steps."""
    lat = ctx.cfg.prune.target_latency
    if not lat.active:
        return {}
    extra: dict = {"latency_host": environment_facts(ctx.device), "threads": lat.threads}
    if lat.what == "sampler":
        extra["bench.sampler_steps"] = ctx.cfg.bench.sampler_steps
    return extra


def latency_probe(ctx: RunContext, backend: str, batch: int, what: str, warmup: int, repeat: int, threads):
    """A :class:`deploy.latency.LatencyProbe` set up from the run (device, sampler steps, precision)."""
    from deploy.latency import LatencyProbe

    return LatencyProbe(
        backend,
        batch,
        what,
        ctx.cfg.bench.sampler_steps,
        ctx.device if backend == "torch" else torch.device("cpu"),
        threads,
        warmup,
        repeat,
        ctx.cfg.build.precision,
        ctx.dense.scheduler_config,
    )


def _latency_search(ctx: RunContext, unet) -> tuple[float, list[dict], dict]:
    """Ratio chosen by measured latency, its trials, and a summary for the record."""
    from deploy.latency import search_latency

    cfg = ctx.cfg.prune
    lat = cfg.target_latency
    probe = latency_probe(ctx, lat.backend, lat.batch, lat.what, lat.warmup, lat.repeat, lat.threads)
    log("prune", f"latency search: {lat.goal()} on {probe.describe()} (margin {lat.margin:.0%})")

    def on_trial(row: dict) -> None:
        verdict = "meets" if row["meets"] else "misses"
        log(
            "prune",
            f"trial ratio {row['ratio']:.4f}: {row['macs_kept']:.3f} of MACs, "
            f"dense {row['dense_ms']:.2f} ms, pruned {row['median_ms']:.2f} ms, "
            f"{row['speedup']:.2f}x ({verdict} the target)",
        )

    began = time.perf_counter()
    ratio, trials = search_latency(
        unet, lat, probe, cfg.round_to, ctx.image_shape(), cfg.search, on_trial=on_trial
    )
    chosen = next(t for t in trials if t["ratio"] == round(ratio, 6))
    milder = [t for t in trials if t["ratio"] < chosen["ratio"]]
    summary = {
        **dataclasses.asdict(lat),
        "probe": probe.describe(),
        "chosen": chosen,
        "next_milder": milder[-1] if milder else None,
        "search_seconds": round(time.perf_counter() - began, 1),
    }
    log(
        "prune",
        f"latency search: ratio {ratio:.4f} measured {chosen['speedup']:.2f}x ({chosen['median_ms']:.2f} ms) "
        f"in {summary['search_seconds']:.0f} s",
    )
    return ratio, trials, summary


def run(ctx: RunContext) -> StageResult:
    """Prune the dense model by ``prune`` and save it to ``RUN/prune/model``."""
    cfg = ctx.cfg.prune
    loaded = ctx.dense
    unet = copy.deepcopy(loaded.unet).to(ctx.device)
    macs_before, params_before = count_macs_params(unet)
    log("prune", f"dense: {params_before / 1e6:.2f}M params, {macs_before / 1e9:.3f}G MACs")
    noise_scheduler = ctx.noise_scheduler()
    needs_data = cfg.method in ("diff-pruning", "taylor")
    images, eval_images = _prune_images(ctx, needs_data)
    loss_dense = _eval_loss(unet, noise_scheduler, eval_images, ctx.cfg.seed)

    bar = None

    def on_trial(r: float, macs: float, params: float) -> None:
        log("prune", f"search: ratio {r:.4f} keeps {macs:.3f} of MACs, {params:.3f} of params")

    def on_step(t: int, loss: float) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(desc="[prune] Taylor pass", unit="timestep", leave=False)
        bar.update(1)
        bar.set_postfix(t=t, loss=f"{loss:.4f}")

    trials: list[dict] = []
    latency = None
    if cfg.target_latency.active:
        ratio, trials, latency = _latency_search(ctx, unet)
        cfg = dataclasses.replace(cfg, ratio=ratio, target_latency=type(cfg.target_latency)())
    try:
        result = prune_unet(unet, noise_scheduler, images, cfg, ctx.cfg.seed, on_step, on_trial)
    finally:
        if bar is not None:
            bar.close()
    if result.taylor is not None:
        tp_ = result.taylor
        log(
            "prune",
            f"Taylor pass: {len(tp_.timesteps)} timesteps ({tp_.timesteps[0]}..{tp_.timesteps[-1]}), "
            f"{tp_.seconds_per_timestep:.2f} s per timestep",
        )
    unet.eval()
    macs_after, params_after = count_macs_params(unet)
    loss_pruned = _eval_loss(unet, noise_scheduler, eval_images, ctx.cfg.seed)
    log(
        "prune",
        f"pruned ({cfg.method}, ratio {result.ratio:.4f}): {params_after / 1e6:.2f}M params "
        f"({params_after / params_before:.3f}), {macs_after / 1e9:.3f}G MACs "
        f"({macs_after / macs_before:.3f})",
    )
    ctx.stage_dir("prune")
    out = runlayout.model_dir(ctx.run_dir, "prune")
    files = save_unet(
        unet.cpu(),
        out,
        dense_config(loaded.unet),
        result.history,
        result.kept_widths,
        extra={"method": cfg.method, "ratio": result.ratio, "scheduler_config": loaded.scheduler_config},
    )
    metrics = {
        "method": cfg.method,
        "ratio": result.ratio,
        "target": {
            **{k: getattr(ctx.cfg.prune, k) for k in ("ratio", "target_macs", "target_params")},
            "target_latency": latency,
        },
        "params_before": params_before,
        "params_after": params_after,
        "macs_before": macs_before,
        "macs_after": macs_after,
        "params_kept": params_after / params_before,
        "macs_kept": macs_after / macs_before,
        "timesteps_used": result.taylor.timesteps if result.taylor else [],
        "taylor_losses": result.taylor.losses if result.taylor else [],
        "seconds_per_timestep": result.taylor.seconds_per_timestep if result.taylor else None,
        "threshold": cfg.threshold if cfg.method == "diff-pruning" else None,
        "criterion": {
            "group_selection": cfg.group_selection,
            "taylor_score": cfg.taylor_score if needs_data else None,
            "group_reduction": cfg.group_reduction,
        },
        "taylor_images": 0 if images is None else len(images),
        "eval_images": 0 if eval_images is None else len(eval_images),
        "loss_dense": loss_dense,
        "loss_after_pruning": loss_pruned,
        "kept_widths": result.kept_widths,
        "kept_channels": result.kept_channels,
        "diagnostics": result.taylor.diagnostics if result.taylor else [],
        "search": result.search,
        "trials": trials,
    }
    return StageResult(metrics, files)


def _prune_images(ctx: RunContext, needs_data: bool):
    """(Taylor batch or None, held-out images or None) on the run's device."""
    cfg = ctx.cfg.prune
    if not needs_data and not cfg.eval_batch:
        return None, None
    taylor, holdout = taylor_and_holdout(
        ctx.dataset, cfg.batch_size if needs_data else 0, cfg.eval_batch, ctx.cfg.seed
    )
    if cfg.eval_batch and (holdout is None or len(holdout) < cfg.eval_batch):
        got = 0 if holdout is None else len(holdout)
        log("prune", f"only {got} of prune.eval_batch={cfg.eval_batch} images could be held out")
    return (taylor.to(ctx.device) if taylor is not None else None), (
        holdout.to(ctx.device) if holdout is not None else None
    )


def _eval_loss(unet, noise_scheduler, images, seed: int) -> float | None:
    return None if images is None else denoising_eval_loss(unet, noise_scheduler, images, seed)
