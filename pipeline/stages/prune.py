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
    extra: dict = {"latency_host": environment_facts(ctx.device)}
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


def _hardware_aware(ctx: RunContext):
    """An ``allocate(unet, importance)`` for prune_unet, the trial list it fills, and its summary.

    Per-level latency table (measured once per architecture/backend/batch/host, cached),
    importance each level's ratio would remove, allocations predicted to meet the target
    ranked by importance kept; the best few are measured for real and the first that
    meets the target (with its margin) wins; if none does, the uniform search decides.
    """
    from compressor.pruning import importance_by_level, uniform_ratios
    from deploy.latency import allocate_levels, level_latency_table, search_latency, time_structure

    cfg = ctx.cfg.prune
    lat = cfg.target_latency
    probe = latency_probe(ctx, lat.backend, lat.batch, lat.what, lat.warmup, lat.repeat, lat.threads)
    shape = ctx.image_shape()
    trials: list[dict] = []
    summary: dict = {**dataclasses.asdict(lat), "probe": probe.describe(), "search": "latency"}

    def allocate(unet, importance) -> dict[int, float]:
        began = time.perf_counter()
        ratios = uniform_ratios(unet)
        log("prune", f"hardware-aware allocation: {lat.goal()} on {probe.describe()}")

        def on_row(row: dict) -> None:
            log(
                "prune",
                f"latency table: level {row['level']} at ratio {row['ratio']:g} saves {row['saving']:.1%}",
            )

        table, cached = level_latency_table(
            unet, probe, cfg.round_to, shape, ratios, environment_facts(ctx.device), on_row
        )
        if cached:
            log(
                "prune", f"latency table: {len(table)} rows from the cache (same architecture, backend, host)"
            )
        imp = importance_by_level(unet, importance, ratios)
        total = sum(v["total"] for v in imp.values()) or 1.0
        ranked = allocate_levels(table, imp, lat)
        measured: set[tuple] = set()
        scale = 1.0
        summary.update(
            table=table,
            table_cached=cached,
            importance={str(k): v["total"] / total for k, v in imp.items()},
            uniform_reference=[
                {"ratio": r, "importance_kept": 1 - sum(v["removed"][r] for v in imp.values()) / total}
                for r in ratios
            ],
            candidates=len(ranked),
        )
        if not ranked:
            log("prune", "no allocation is predicted to meet the target: the uniform search decides")
        chosen = None
        for _ in range(4):  # measure the best predicted allocation; recalibrate after a miss
            fresh = [c for c in ranked if tuple(c["levels"].items()) not in measured]
            if not fresh:
                break
            cand = fresh[0]
            measured.add(tuple(cand["levels"].items()))
            row = time_structure(unet, probe, cfg.round_to, shape, 0.0, cand["levels"])
            row.update(
                meets=lat.met(row["speedup"], row["median_ms"]),
                predicted_speedup=cand["predicted_speedup"],
                importance_kept=cand["importance_kept"],
            )
            trials.append(row)
            log(
                "prune",
                f"allocation {row['levels']}: predicted {cand['predicted_speedup']:.2f}x, measured "
                f"{row['speedup']:.2f}x, importance kept {cand['importance_kept']:.3f} "
                f"({'meets' if row['meets'] else 'misses'} the target)",
            )
            if row["meets"]:
                chosen, summary["chosen"] = cand["levels"], row
                break
            predicted = 1 - 1 / cand["predicted_speedup"]
            if predicted > 0 and row["speedup"] > 0:  # the sum of single-level savings was off by this
                scale = min(1.5, max(0.3, scale * (1 - 1 / row["speedup"]) / predicted))
                ranked = allocate_levels(table, imp, lat, scale=scale)
        if chosen is None:
            log("prune", "no predicted allocation met the target when measured: uniform search decides")
            ratio, rows = search_latency(unet, lat, probe, cfg.round_to, shape, "fine")
            trials.extend(rows)
            chosen = dict.fromkeys(sorted({r["level"] for r in table}), ratio)
            summary["chosen"] = next(t for t in rows if t["ratio"] == round(ratio, 6))
        summary["calibration"] = scale
        summary["search_seconds"] = round(time.perf_counter() - began, 1)
        return chosen

    return allocate, trials, summary


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
    allocate = None
    if cfg.search == "latency":
        allocate, trials, latency = _hardware_aware(ctx)
        cfg = dataclasses.replace(cfg, target_latency=type(cfg.target_latency)())
    elif cfg.target_latency.active:
        ratio, trials, latency = _latency_search(ctx, unet)
        cfg = dataclasses.replace(cfg, ratio=ratio, target_latency=type(cfg.target_latency)())
    try:
        result = prune_unet(
            unet, noise_scheduler, images, cfg, ctx.cfg.seed, on_step, on_trial, allocate=allocate
        )
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
    if result.level_ratios:
        log(
            "prune",
            "per-level ratios: " + ", ".join(f"level {k}: {v:g}" for k, v in result.level_ratios.items()),
        )
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
        "importance_kept": result.importance_kept,
        "level_ratios": {str(k): v for k, v in (result.level_ratios or {}).items()},
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
